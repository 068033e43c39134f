"""The benchmarks run on the GPU for two steps each, so that they cannot rot between measurements."""

import json

import pytest

from pipeline.bench.train import DEFAULT
from tests.conftest import run_mixer

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_bench_train_runs_every_default_variant_and_the_end_to_end_row(tmp_path):
    out = tmp_path / "train.json"
    result = run_mixer(
        "bench", "train", "--model", "S/32", "--batch", "16", "--steps", "2", "--warmup", "1", "--end-to-end",
        "--generate", "64", "--workers", "2", "--json", str(out),
        env={"MIXER_BENCH_CACHE": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads(out.read_text())
    names = [row["name"] for row in report["rows"]]
    assert {v.name for v in DEFAULT} <= set(names) and any(name.endswith("from JPEG shards") for name in names)
    for row in report["rows"]:
        assert row["images_per_s"] > 0 and 0 < row["mfu"] < 1, row
    assert "img/s" in result.stdout and report["end_to_end_ratio"] > 0


def test_bench_data_runs_the_gpu_decode_path(tmp_path):
    out = tmp_path / "data.json"
    result = run_mixer(
        "bench", "data", "--decode", "gpu", "--workers", "2", "--batch", "32", "--batches", "2", "--generate", "96",
        "--baseline-images", "32", "--json", str(out),
        env={"MIXER_BENCH_CACHE": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads(out.read_text())
    assert report["decode"] == "gpu" and report["images_per_s"] > 0 and report["baseline_images_per_s"] > 0
