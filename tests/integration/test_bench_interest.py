"""The interest bench's own smoke test (issue 21): ``python -m bench.interest --quick``'s run
through the real processes, so it cannot rot between runs, and its figures make sense."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.interest import QUICK, run, summary

pytestmark = pytest.mark.slow


def test_interest_bench_quick_run_delivers_everything_and_counts_what_each_gateway_gets(
    tmp_path: Path,
) -> None:
    results = run(QUICK, tmp_path)
    print(summary(results))
    phases = results["phases"]
    assert set(phases) == {"disjoint", "shared", "churn"}
    assert set(phases["churn"]) == {"wildcard", "rooms", "rooms-linger0"}
    for layout, modes in phases.items():
        for mode, r in modes.items():
            where = f"{layout}/{mode}"
            assert r["sent"] > 0, where
            assert r["delivery_ratio"] >= 0.99, where
            assert len(r["gateway_cpu_s"]) == QUICK.gateways, where
            assert all(c > 0 for c in r["gateway_cpu_s"]), where
    sent = phases["disjoint"]["rooms"]["sent"]
    # Room by room, each stored message reaches only the one gateway its room's members are
    # on; with the wildcards, every gateway gets every message.
    received = phases["disjoint"]["rooms"]["gateway_received"]
    assert sum(received) == sent
    assert max(received) - min(received) <= 1
    assert (
        phases["disjoint"]["wildcard"]["gateway_received"]
        == [phases["disjoint"]["wildcard"]["sent"]] * QUICK.gateways
    )
    for mode in ("wildcard", "rooms"):
        r = phases["shared"][mode]
        assert r["gateway_received"] == [r["sent"]] * QUICK.gateways, mode
    for mode, r in phases["churn"].items():
        assert r["joins"] > 0 and r["join_errors"] == 0, mode
        assert r["join_p99_ms"] > 0 and "added_gateway_cpu_s" in r, mode
        made = sum(r["room_subscribes"])
        assert (made == 0) if mode == "wildcard" else (made > 0), mode
