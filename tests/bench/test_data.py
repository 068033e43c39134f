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
    # "per core" counts CPU seconds: the worker's must be seen (it does the decoding), and the ratio is per CPU-second
    assert data["worker_cpu_ms_per_image"] > 0.5 * data["main_cpu_ms_per_image"]
    assert data["per_core_speedup"] == data["images_per_cpu_s"] / data["baseline_images_per_cpu_s"]
    assert "naive PIL" in result.stdout
