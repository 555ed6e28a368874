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
                best = sc[key].get(kind, {}).get("max_ok")
                vals.append(best[metric] if best else float("nan"))
            rows.append((key, metric, vals[0], vals[1]))
    for key in ("a", "b"):
        fan, base = (sc.get(key, {}).get(k, {}).get("max_ok") for k in ("fanout", "baseline"))
        if fan and base:
            rows.append(
                (
                    key,
                    "delivered_per_s, fan-out only",
                    fan["delivered_per_s"],
                    base["delivered_per_s"],
                )
            )
    for key, v in sc.items():
        if key.startswith("c"):
            rb, base = (v.get(k, {}).get("kib_per_conn", float("nan")) for k in KINDS)
            rows.append((key, "kib_per_conn", rb, base))
    return rows


KINDS = ("roombus", "baseline")
# kind -> plot colour; "fanout" is roombus with EPHEMERAL_ROOMS=* and no history service.
COLOURS = {"roombus": "tab:blue", "fanout": "tab:green", "baseline": "tab:gray"}


def _steps(results: dict[str, Any], key: str, kind: str) -> list[dict[str, Any]]:
    # by rate: the ramp's refining steps run after the first failing one
    steps = results["scenarios"].get(key, {}).get(kind, {}).get("steps", [])
    return sorted(steps, key=lambda s: s["rate"])


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for ax, key in zip(axes[:2], ("a", "b"), strict=True):
        if key not in results["scenarios"]:
            ax.set_visible(False)
            continue
        for kind, color in COLOURS.items():
            steps = _steps(results, key, kind)
            if not steps:
                continue
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
    for kind, color, shift in (("roombus", "tab:blue", -0.2), ("baseline", "tab:gray", 0.2)):
        ax.bar(
            [i + shift for i in x],
            [results["scenarios"][k].get(kind, {}).get("kib_per_conn", 0) for k in cs],
            0.4,
            label=kind,
            color=color,
        )
    ax.axhline(25, color="red", lw=0.8)
    ax.set_xticks(list(x), [k[1:] + " idle" for k in cs])
    ax.set_ylabel("KiB RSS per idle connection")
    ax.set_title("(c) idle connections, one process")
    ax.legend(fontsize=8)
    ax = axes[3]
    d = {k: v for k, v in results["scenarios"].get("d", {}).items() if isinstance(v, dict)}
    for (name, run), color in zip(sorted(d.items()), ("tab:green", "tab:purple"), strict=False):
        steps = sorted(run.get("steps", []), key=lambda s: s["rate"])
        ax.plot(
            [s["rate"] for s in steps],
            [s["acked_per_s"] for s in steps],
            "o-",
            color=color,
            label=f"{run.get('replicas', name)} history replica(s)",
        )
    ax.set_xlabel("sent msgs/s (with client_id)")
    ax.set_ylabel("stored + acked msgs/s")
    ax.set_title("(d) history store rate, 1 gateway")
    if d:
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
            for kind in KINDS:
                if kind in v:
                    lines.append(
                        f"| {key} | {kind} opened / errors | {v[kind]['opened']} / "
                        f"{v[kind]['errors']} | | |"
                    )
    for key in ("a", "b"):
        best = results["scenarios"].get(key, {}).get("roombus", {}).get("max_ok")
        if best and best.get("history_cpu_s_per_100k") is not None:
            lines.append(
                f"| {key} | history_cpu_s_per_100k (2 replicas) | "
                f"{best['history_cpu_s_per_100k']:.1f} | | |"
            )
    for name, run in sorted(results["scenarios"].get("d", {}).items()):
        if not isinstance(run, dict):
            continue
        best = run.get("max_ok")
        if not best:
            lines.append(f"| d | {name}: no passing step | | | |")
            continue
        lines.append(
            f"| d | acked_per_s, {run['replicas']} history replica(s) | "
            f"{best['acked_per_s']:.0f} (p99 {best['p99_ms']:.1f} ms) | | |"
        )
        lines.append(
            f"| d | stored / acked, {run['replicas']} replica(s) | "
            f"{run['stored_total']} / {run['acked_total']} | | |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    print(table(json.loads(Path(sys.argv[1]).read_text())))
