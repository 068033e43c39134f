import json

from tests.conftest import run_mixer


def test_bench_data_reports_ours_and_the_naive_baseline(tmp_path):
    out = tmp_path / "bench.json"
    result = run_mixer(
        "bench", "data", "--generate", "240", "--batch", "16", "--batches", "3", "--image-size", "64",
        "--baseline-images", "30", "--workers", "1", "--json", str(out),
        env={"MIXER_BENCH_CACHE": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["images_per_s"] > 0 and data["baseline_images_per_s"] > 0 and data["samples"] == 240
    runs = data["baseline_runs_images_per_s"]  # before ours and after: their mean is the baseline
    assert len(runs) == 2 and abs(sum(runs) / 2 - data["baseline_images_per_s"]) < 1e-6
    assert "naive PIL" in result.stdout
