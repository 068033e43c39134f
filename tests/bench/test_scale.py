"""`mixer bench scale` on CPU ranks (gloo): real `mixer run`s, read back as rows."""

import json

import pytest

from tests.conftest import REPO, run_mixer

pytestmark = pytest.mark.slow


def test_scale_runs_the_experiment_on_each_number_of_ranks(tmp_path):
    result = run_mixer(
        "bench", "scale", str(REPO / "tests" / "configs" / "resume.yaml"),
        f"datasets.shapes.path={tmp_path}/shapes", "stages.pretrain.steps=2", "stages.pretrain.log_every=1",
        "--ranks", "1", "2", "--zero", "2", "--workdir", str(tmp_path / "runs"), "--json", str(tmp_path / "scale.json"),
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "scale.json").read_text())["rows"]
    assert [(r["zero_stage"], r["ranks"]) for r in rows] == [(2, 1), (2, 2)]
    for row in rows:
        done = json.loads((tmp_path / "runs" / f"zero2-{row['ranks']}rank/stages/pretrain/result.json").read_text())
        assert done["world_size"] == row["ranks"] and row["images_per_s"] == done["train/img_per_s"] > 0
    assert rows[0]["scaling_efficiency"] == 1.0
    assert rows[1]["scaling_efficiency"] == pytest.approx(rows[1]["images_per_s"] / 2 / rows[0]["images_per_s"])
    # One rank agrees with nobody; two wait on each other over gloo at every step.
    assert rows[0]["sync_wait_frac"] < rows[1]["sync_wait_frac"] < 1 and rows[0]["sync_wait_frac"] < 0.01
    assert all(0 < r["data_wait_frac"] < 1 for r in rows)
    assert "scaling eff." in result.stdout and "host sync" in result.stdout
