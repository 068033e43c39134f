"""`mixer bench allreduce` on CPU ranks (gloo): it starts its own ranks, and rank 0 reports."""

import json

import pytest

from tests.conftest import run_mixer

pytestmark = pytest.mark.slow


def test_allreduce_starts_its_own_ranks_and_reports_bus_bandwidth(tmp_path):
    result = run_mixer(
        "bench", "allreduce", "--ranks", "2", "--sizes", "1", "4", "--iters", "2", "--json", str(tmp_path / "ar.json")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "ar.json").read_text())["rows"]
    assert [(r["ranks"], r["size_mib"]) for r in rows] == [(2, 1.0), (2, 4.0)]
    for r in rows:  # 2 ranks: bus bandwidth = algorithm bandwidth x 2(n-1)/n = the same
        assert r["busbw_gb_s"] == pytest.approx(r["algbw_gb_s"]) and r["time_ms"] > 0
