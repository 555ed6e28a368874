"""The plot and the ratio table from a results JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def headline(results: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    rows = []
    sc = results["scenarios"]
    for key in ("a", "b"):
        if key not in sc:
            continue
        for metric in ("delivered_per_s", "p99_ms", "cpu_s_per_100k"):
            vals = []
            for kind in ("roombus", "baseline"):
                best = sc[key][kind]["max_ok"]
                vals.append(best[metric] if best else 0.0)
            rows.append((key, metric, vals[0], vals[1]))
    for key, v in sc.items():
        if key.startswith("c"):
            rows.append(
                (key, "kib_per_conn", v["roombus"]["kib_per_conn"], v["baseline"]["kib_per_conn"])
            )
    return rows


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key in zip(axes[:2], ("a", "b"), strict=True):
        for kind, color in (("roombus", "tab:blue"), ("baseline", "tab:gray")):
            steps = results["scenarios"][key][kind]["steps"]
            ax.plot(
                [s["rate"] for s in steps],
                [s["p99_ms"] for s in steps],
                "o-",
                color=color,
                label=f"{kind} p99",
            )
            ax.plot(
                [s["rate"] for s in steps],
                [s["p50_ms"] for s in steps],
                "x--",
                color=color,
                label=f"{kind} p50",
            )
        ax.axhline(250, color="red", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("published msgs/s")
        ax.set_ylabel("latency ms")
        ax.set_title("(a) 200 subs, 1 room" if key == "a" else "(b) 200 subs, 100 rooms")
        ax.legend(fontsize=8)
    cs = [k for k in results["scenarios"] if k.startswith("c")]
    x = range(len(cs))
    ax = axes[2]
    ax.bar(
        [i - 0.2 for i in x],
        [results["scenarios"][k]["roombus"]["kib_per_conn"] for k in cs],
        0.4,
        label="roombus",
        color="tab:blue",
    )
    ax.bar(
        [i + 0.2 for i in x],
        [results["scenarios"][k]["baseline"]["kib_per_conn"] for k in cs],
        0.4,
        label="baseline",
        color="tab:gray",
    )
    ax.axhline(25, color="red", lw=0.8)
    ax.set_xticks(list(x), [k[1:] + " idle" for k in cs])
    ax.set_ylabel("KiB RSS per idle connection")
    ax.set_title("(c) idle connections, one process")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def table(results: dict[str, Any]) -> str:
    """A markdown table: roombus, baseline and the ratio per scenario and figure."""
    lines = [
        "| scenario | figure | roombus | baseline | roombus/baseline |",
        "|---|---|---|---|---|",
    ]
    for key, metric, rb, base in headline(results):
        ratio = rb / base if base else float("nan")
        lines.append(f"| {key} | {metric} | {rb:.1f} | {base:.1f} | {ratio:.2f} |")
    for key, v in results["scenarios"].items():
        if key.startswith("c"):
            for kind in ("roombus", "baseline"):
                lines.append(
                    f"| {key} | {kind} opened / errors | {v[kind]['opened']} / "
                    f"{v[kind]['errors']} | | |"
                )
        if key == "d":
            lines.append(f"| d | history store rate | {v.get('skipped', v)} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    print(table(json.loads(Path(sys.argv[1]).read_text())))
