"""The bench's own smoke test: a short (d) run through the real processes, so `make bench`
cannot rot between runs (issue 18)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.__main__ import scenario_d

pytestmark = pytest.mark.slow


def test_bench_store_scenario_acks_only_what_is_stored(tmp_path: Path) -> None:
    # Two history replicas, a low rate: every step passes and every ack is in HISTORY.
    result = scenario_d(2, [100], 1.0, tmp_path)
    assert result["max_ok"] is not None
    assert all(step["ok"] for step in result["steps"])
    assert all(not step["errors"] for step in result["steps"])
    assert result["acked_total"] == result["stored_total"]
    assert result["acked_total"] >= 0.99 * sum(step["sent"] for step in result["steps"])
