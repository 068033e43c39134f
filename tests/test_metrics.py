"""A training window's clock: throughput and the waits are shares of the time spent training, not of the time
spent evaluating or saving inside the window."""

import json
import time
from pathlib import Path

import pytest
import webdataset as wds
from mlflow.tracking import MlflowClient

from pipeline.data import synthetic
from pipeline.metrics import Window
from tests.conftest import REPO, run_mixer


def test_a_window_leaves_out_the_time_it_was_paused():
    window = Window(start=time.time() - 10.0, paused_s=4.0)
    assert window.training_s() == pytest.approx(6.0, abs=0.5)
    window.paused_s += 6.0 - 0.1
    assert 0 < window.training_s() < 0.7


@pytest.mark.slow
def test_a_corrupt_image_is_skipped_counted_over_the_ranks_and_named_in_the_run(tmp_path):
    """`mixer run` on 2 ranks over shards in which one JPEG does not decode: the stage finishes, its result counts
    the bad reads of both ranks, and the run's `data/bad_samples.jsonl` names the sample and its shard each time."""
    index = synthetic.write_dataset("shapes", tmp_path / "shapes" / "train", samples=400, size=16, seed=0)
    synthetic.write_dataset("shapes", tmp_path / "shapes" / "eval", samples=64, size=16, seed=1)
    shard = index.urls[0]
    samples = [dict(s) for s in wds.WebDataset([shard], shardshuffle=False)]
    broken = samples[3]["__key__"]
    with wds.TarWriter(shard) as sink:  # the same samples and count, the fourth one's image replaced by garbage
        for s in samples:
            image = b"\xff\xd8 this is not a JPEG" if s["__key__"] == broken else s["jpg"]
            sink.write({"__key__": s["__key__"], "jpg": image, "cls": s["cls"]})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_mixer(
        "run", str(REPO / "tests" / "configs" / "resume.yaml"), f"output_dir={tmp_path}/out",
        f"datasets.shapes.path={tmp_path}/shapes", "stages.pretrain.steps=8", "stages.pretrain.log_every=4",
        env={"MLFLOW_TRACKING_URI": uri},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stage = tmp_path / "out" / "stages" / "pretrain"
    done = json.loads((stage / "result.json").read_text())
    assert done["data/bad_samples"] >= 1  # 8 steps x 64 images read every sample at least once
    events_file = MlflowClient(uri).download_artifacts((stage / "run_id").read_text().strip(), "data/bad_samples.jsonl")
    events = [json.loads(line) for line in Path(events_file).read_text().splitlines()]
    assert {(e["key"], e["url"]) for e in events} == {(broken, shard)}
    assert sum(e["count"] for e in events) == done["data/bad_samples"]
    assert done["data/bad_fraction"] == pytest.approx(done["data/bad_samples"] / (8 * 64 + done["data/bad_samples"]))
