"""The benches' own smoke tests: a short (d) run through the real processes (issue 18), and a
short ``bench.shards`` run per shard count on a 3-node cluster (issue 21), so neither bench
can rot between runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.__main__ import scenario_d
from bench.shards import run_shards
from proto.shards import HistoryLayout

pytestmark = pytest.mark.slow


def test_bench_store_scenario_acks_only_what_is_stored(tmp_path: Path) -> None:
    # Two history replicas, a low rate: every step passes and every ack is in HISTORY.
    result = scenario_d(2, [100], 1.0, tmp_path)
    assert result["max_ok"] is not None
    assert all(step["ok"] for step in result["steps"])
    assert all(not step["errors"] for step in result["steps"])
    assert result["acked_total"] == result["stored_total"]
    assert result["acked_total"] >= 0.99 * sum(step["sent"] for step in result["steps"])


@pytest.mark.parametrize("shards", [1, 3])
def test_bench_shards_acks_only_what_its_shard_stream_holds(tmp_path: Path, shards: int) -> None:
    # A 3-node cluster, R3, a low rate over a few senders and rooms: every step passes and
    # every ack's seq holds its id on the room's subject in the room's shard stream.
    result = run_shards(shards, [60], 1.0, tmp_path, senders=4, rooms=12)
    assert result["max_ok"] is not None and all(step["ok"] for step in result["steps"])
    assert result["acks_checked"] == result["acked_total"] == result["stored_total"] > 0
    assert result["acks_missing"] == result["acks_wrong"] == 0
    assert set(result["stored_per_stream"]) == set(HistoryLayout(shards).streams())
    assert all(n > 0 for n in result["stored_per_stream"].values())
