"""`mixer bench remat` runs on the CPU too: the memory each `model.remat` setting keeps, read back from its JSON."""

import json

from tests.conftest import run_mixer


def test_bench_remat_reports_the_activation_memory_of_each_setting(tmp_path):
    """`mixer bench remat` on the CPU: recomputing more keeps less per image, and recomputing also drops the bf16
    copies of the weights that autocast keeps (they are cast again in the backward pass)."""
    result = run_mixer("bench", "remat", "--model", "S/32", "--json", str(tmp_path / "remat.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["remat"]: r for r in json.loads((tmp_path / "remat.json").read_text())["rows"]}
    assert rows["blocks"]["mib_per_image"] < rows["matmuls"]["mib_per_image"] < rows["none"]["mib_per_image"]
    assert rows["matmuls"]["fixed_mib"] < rows["none"]["fixed_mib"]
    assert "kept for the backward pass" in result.stdout
