"""The integration test: the tiny experiment end to end through `mixer run` (torchrun, 2 ZeRO ranks, MLflow)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from pipeline.checkpoint import load_exported
from pipeline.config import AugmentConfig
from pipeline.data.index import read_index
from pipeline.data.stream import eval_batches
from pipeline.data.transforms import eval_transform, normalize
from pipeline.dist import free_port
from pipeline.stages import launch_command
from tests.conftest import REPO, run_mixer

pytestmark = pytest.mark.slow
TINY = REPO / "tests" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    uri = f"sqlite:///{tmp}/mlflow.db"
    args = [
        "run",
        str(TINY),
        f"output_dir={tmp}/out",
        f"datasets.shapes.path={tmp}/shapes",
        f"datasets.novel.path={tmp}/novel",
    ]
    first = run_mixer(*args, env={"MLFLOW_TRACKING_URI": uri})
    assert first.returncode == 0, first.stdout + first.stderr
    return tmp, uri, args, first


def test_summary_names_every_stage_and_the_ui(tiny_run):
    tmp, uri, _, result = tiny_run
    for stage in ("pretrain", "finetune", "eval"):
        assert stage in result.stdout
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny")
    # The UI's start command and the experiment's runs view, not MLflow 3's GenAI overview, which it opens on
    # unless the experiment says it is model training.
    assert f"mlflow ui --backend-store-uri {uri} --port 5000" in result.stdout
    assert f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs" in result.stdout
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "Traceback" not in result.stderr
    # The parent run's description is the config's header: what it is, its command, its hardware.
    parent = client.get_run((tmp / "out" / "parent_run_id").read_text().strip())
    description = parent.data.tags["mlflow.note.content"]
    assert description.startswith("The integration test's experiment") and "Command: pytest" in description
    assert (tmp / "out" / "config.yaml").read_text().startswith("# The integration test's experiment")


def test_checkpoints_are_sharded_per_rank(tiny_run):
    tmp = tiny_run[0]
    ckpts = tmp / "out" / "stages" / "pretrain" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step-00000003", "step-00000006"]
    assert (ckpts / "latest").read_text().strip() == "step-00000006"
    for rank in (0, 1):
        assert list((ckpts / "step-00000006").glob(f"zero_pp_rank_{rank}_*optim_states.pt"))
    ds = json.loads((tmp / "out" / "stages" / "pretrain" / "deepspeed.json").read_text())
    assert ds["train_batch_size"] == 16 * 2 * 2 and ds["zero_optimization"]["stage"] == 2


def test_mlflow_holds_one_parent_and_a_finished_child_per_stage(tiny_run):
    _, uri, _, _ = tiny_run
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["stage"] for r in children) == ["eval", "finetune", "pretrain"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    pretrain = next(r for r in children if r.data.tags["stage"] == "pretrain")
    assert pretrain.data.params["stage.optim.name"] == "adamw"
    assert pretrain.data.params["model.hidden_dim"] == "32"
    losses = client.get_metric_history(pretrain.info.run_id, "train/loss")
    assert [m.step for m in losses] == [2, 4, 6]
    assert [m.step for m in client.get_metric_history(pretrain.info.run_id, "eval/top1")] == [3, 6]
    assert pretrain.data.tags["mfu/peak_source"].startswith("estimated")  # a CPU is not in the peak table
    assert 0 < pretrain.data.metrics["train/mfu"] < 1
    for key in ("train/lr", "train/img_per_s", "train/mfu", "eval/top5"):
        assert client.get_metric_history(pretrain.info.run_id, key)
    # Shares of each window's host time: the evaluation at step 3 falls inside a window and is not counted in it.
    for key in ("train/data_wait_frac", "train/sync_wait_frac"):
        assert all(0 <= m.value < 1 for m in client.get_metric_history(pretrain.info.run_id, key)), key
    artifacts = {a.path for a in client.list_artifacts(pretrain.info.run_id)}
    assert {"config.yaml", "deepspeed.json", "model"} <= artifacts
    model_files = {a.path for a in client.list_artifacts(pretrain.info.run_id, "model")}
    assert model_files == {"model/model.safetensors", "model/model.json"}
    # Each training stage is a version of the registered model named like the experiment.
    versions = {v.run_id: v for v in client.search_model_versions("name='tiny'")}
    finetune = next(r for r in children if r.data.tags["stage"] == "finetune")
    assert versions.keys() == {pretrain.info.run_id, finetune.info.run_id}
    assert versions[finetune.info.run_id].tags["stage"] == "finetune"
    assert finetune.data.tags["model_version"] == f"tiny/{versions[finetune.info.run_id].version}"
    assert parents[0].data.params["stages.finetune.optim.name"] == "sgd"
    evaluation = next(r for r in children if r.data.tags["stage"] == "eval")
    for k in (1, 5):
        assert 0.0 <= evaluation.data.metrics[f"fewshot/novel/{k}shot"] <= 1.0
    assert evaluation.data.metrics["eval/resmall-crop/samples"] == 130


def test_exported_weights_reproduce_the_eval_stage_without_deepspeed(tiny_run):
    tmp = tiny_run[0]
    model = load_exported(tmp / "out" / "stages" / "finetune" / "model.safetensors").eval()
    assert (model.spec.image_size, model.spec.num_patches, model.spec.tokens_mlp_dim) == (32, 64, 64)
    index = read_index(tmp / "novel" / "eval")
    correct = seen = 0
    with torch.no_grad():
        for images, labels in eval_batches(
            index,
            rank=0,
            world_size=1,
            batch_size=32,
            image_size=32,
            transform=eval_transform(AugmentConfig(), 32),
            num_workers=0,
        ):
            correct += int((model(normalize(images)).argmax(-1) == labels).sum())
            seen += labels.numel()
    reported = json.loads((tmp / "out" / "stages" / "eval" / "result.json").read_text())
    assert seen == 130
    assert correct / seen == pytest.approx(reported["eval/top1"], abs=1e-9)


def test_mixer_export_consolidates_a_checkpoint_without_a_launcher(tiny_run, tmp_path):
    stage = tiny_run[0] / "out" / "stages" / "pretrain"
    result = run_mixer("export", str(stage), str(tmp_path / "latest.safetensors"))
    assert result.returncode == 0, result.stderr[-3000:]
    exported, final = load_file(tmp_path / "latest.safetensors"), load_file(stage / "model.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    assert json.loads((tmp_path / "model.json").read_text()) == json.loads((stage / "model.json").read_text())
    earlier = run_mixer("export", str(stage / "checkpoints" / "step-00000003"), str(tmp_path / "three.safetensors"))
    assert earlier.returncode == 0, earlier.stderr[-3000:]
    model = load_exported(tmp_path / "three.safetensors")
    assert not torch.equal(model.state_dict()["head.weight"], final["head.weight"])


def test_rerun_skips_finished_stages_and_keeps_one_parent(tiny_run):
    tmp, uri, args, _ = tiny_run
    again = run_mixer(*args, env={"MLFLOW_TRACKING_URI": uri})
    assert again.returncode == 0, again.stderr
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)


def test_launch_command_spans_nodes_with_a_rendezvous(tmp_path):
    from pipeline.config import load_config

    cfg = load_config(TINY, ["launch.nnodes=2", "launch.rdzv_endpoint=node0:29400"])
    cmd = launch_command(cfg, tmp_path / "config.yaml", cfg.stage("pretrain"), "abc", node_rank=1)
    assert "--standalone" not in cmd
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "node0:29400" and cmd[cmd.index("--node-rank") + 1] == "1"
    assert cmd[-4:] == ["--name", "pretrain", "--parent-run-id", "abc"]


def test_the_deepspeed_launcher_starts_the_same_stage(tiny_run, tmp_path):
    """README: `deepspeed --num_gpus N --module pipeline stage CONFIG --name S` (it passes --local_rank first)."""
    out = tmp_path / "out"
    shutil.copytree(tiny_run[0] / "out", out)
    shutil.rmtree(out / "stages" / "eval")
    config = out / "config.yaml"
    config.write_text(config.read_text().replace(str(tiny_run[0] / "out"), str(out)))
    launcher = Path(sys.executable).parent / "deepspeed"
    result = subprocess.run(
        [
            str(launcher),
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "--module",
            "pipeline",
            "stage",
            str(config),
            "--name",
            "eval",
            "tracking.enabled=false",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    evaluation = json.loads((out / "stages" / "eval" / "result.json").read_text())
    assert evaluation["world_size"] == 2 and evaluation["eval/samples"] == 130


def test_split_mode_with_too_few_shards_is_refused_before_launch(tmp_path):
    # tiny's splits have 8 shards; 2 ranks x 8 workers would leave some workers without a shard
    result = run_mixer(
        "run",
        str(TINY),
        f"output_dir={tmp_path}/out",
        f"datasets.shapes.path={tmp_path}/shapes",
        f"datasets.novel.path={tmp_path}/novel",
        "data.num_workers=8",
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"},
    )
    assert result.returncode == 2, result.stderr
    assert "8 shards, fewer than ranks x workers = 2 x 8" in result.stderr
    assert not (tmp_path / "out" / "stages").exists()


@pytest.fixture()
def tiny_copy(tiny_run, tmp_path):
    """A private copy of the tiny run (output, data, MLflow store) that a test may damage."""
    src = tiny_run[0]
    for name in ("out", "shapes", "novel", "mlflow.db"):
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, tmp_path / name)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["run", str(TINY), f"output_dir={tmp_path}/out", f"datasets.shapes.path={tmp_path}/shapes",
            f"datasets.novel.path={tmp_path}/novel"]  # fmt: skip
    return tmp_path, uri, args


def test_checkpoints_have_a_manifest_and_latest_moves_only_when_complete(tiny_run, tiny_copy):
    tmp, uri, args = tiny_copy
    ckpts = tmp / "out" / "stages" / "pretrain" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-00000006"
    manifest = json.loads((ckpts / "step-00000006" / "manifest.json").read_text())
    shard = next(name for name in manifest["files"] if name.startswith("zero_pp_rank_1_"))
    size, digest = manifest["files"][shard]
    assert size == (ckpts / "step-00000006" / shard).stat().st_size
    assert digest == hashlib.sha256((ckpts / "step-00000006" / shard).read_bytes()).hexdigest()
    assert {"data/rank00000.json", "data/rank00001.json", "rng/rank00000.json", "rng/rank00001.json"} <= manifest[
        "files"
    ].keys()
    # A save killed half-way: a newer folder without a manifest. Run pre-training on to step 9.
    partial = ckpts / "step-00000009"
    partial.mkdir()
    (partial / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"half a file")
    (tmp / "out" / "stages" / "pretrain" / "result.json").unlink()
    result = run_mixer(*args, "stages.pretrain.steps=9", env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (ckpts / "latest").read_text() == "step-00000009" and (partial / "manifest.json").exists()
    run = MlflowClient(uri).get_run((tmp / "out" / "stages" / "pretrain" / "run_id").read_text().strip())
    assert run.data.tags["resumed_from"].endswith("step-00000006")  # the last complete one
    assert "stage.steps" in run.data.tags["resume_changes"]
    assert "checkpoint/save_s" in run.data.metrics


def test_a_corrupt_or_incompatible_checkpoint_is_refused_with_what_differs(tiny_copy):
    tmp, uri, args = tiny_copy
    stage = tmp / "out" / "stages" / "pretrain"
    (stage / "result.json").unlink()
    result = run_mixer(*args, "stages.pretrain.optim.lr=0.5", "model.hidden_dim=48", env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode != 0
    assert "incompatible config" in result.stderr and "hidden_dim" in result.stderr, result.stderr[-4000:]
    shard = next((stage / "checkpoints" / "step-00000006").glob("zero_pp_rank_1_*"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    # The damaged newest checkpoint is passed over, naming the file; the stage continues from the one before.
    result = run_mixer(*args, env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumes from step-00000003, not a newer one" in result.stderr
    assert "is corrupt, refusing to load it" in result.stderr and shard.name in result.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("datasets.shapes.num_classes=5", "'datasets.shapes.num_classes' is 5, but the index of"),
        ("datasets.shapes.generate=null", "stage pretrain evaluates on datasets.shapes's eval split"),
    ],
)
def test_data_problems_visible_before_launch_stop_it(tmp_path, override, message):
    """A class count that contradicts the index, or a held-out split without an index (found after every training
    step before): refused before any rank starts."""
    from pipeline.data import synthetic

    synthetic.write_dataset("shapes", tmp_path / "shapes" / "train", samples=64, size=16, seed=0)  # no eval split
    result = run_mixer(
        "run", str(TINY), f"output_dir={tmp_path}/out", f"datasets.shapes.path={tmp_path}/shapes",
        f"datasets.novel.path={tmp_path}/novel", override, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
    )  # fmt: skip
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out" / "stages").exists()


class _Payload:
    """Pickles as a call to os.system: what a crafted checkpoint file would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _copied_checkpoints(tiny_run, tmp_path):
    source = tiny_run[0] / "out" / "stages" / "pretrain" / "checkpoints"
    return Path(shutil.copytree(source, tmp_path / "checkpoints"))


def test_a_foreign_pickle_in_a_checkpoint_is_refused_and_never_run(tiny_run, tmp_path):
    from pipeline import checkpoint
    from pipeline.engine import SafeCheckpointEngine, UnsafeCheckpoint, consolidated_state_dict

    checkpoints = _copied_checkpoints(tiny_run, tmp_path)
    marker = tmp_path / "payload-ran"
    tag = checkpoints / "step-00000006"
    planted = tag / "mp_rank_00_model_states.pt"
    torch.save({"module": _Payload(marker)}, planted)
    manifest = json.loads((tag / "manifest.json").read_text())  # whoever wrote the folder can rewrite this too
    manifest["files"][planted.name] = [planted.stat().st_size, hashlib.sha256(planted.read_bytes()).hexdigest()]
    (tag / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.CheckpointError, match="asks for posix.system"):
        checkpoint.export_checkpoint(checkpoints, tmp_path / "w.safetensors")
    with pytest.raises(UnsafeCheckpoint):
        consolidated_state_dict(checkpoints, tag.name, zero_stage=0)
    with pytest.raises(UnsafeCheckpoint):
        SafeCheckpointEngine().load(str(planted))
    # A file the manifest does not list (a planted universal conversion) is checked as well.
    other = checkpoints / "step-00000003"
    (other / "universal" / "zero" / "head.weight").mkdir(parents=True)
    torch.save(_Payload(marker), other / "universal" / "zero" / "head.weight" / "fp32.pt")
    with pytest.raises(checkpoint.CheckpointError, match="asks for posix.system"):
        checkpoint.verify(checkpoints, other.name)
    assert not marker.exists()


def test_the_newest_checkpoint_that_verifies_is_resumed_when_latest_is_gone_or_the_newest_damaged(tiny_run, tmp_path):
    from pipeline import checkpoint

    checkpoints = _copied_checkpoints(tiny_run, tmp_path)
    assert checkpoint.newest_verified(checkpoints) == ("step-00000006", [])
    (checkpoints / "latest").unlink()
    tag, passed_over = checkpoint.newest_verified(checkpoints)
    assert tag == "step-00000006" and "latest is missing" in passed_over[0]
    damaged = next((checkpoints / "step-00000006").glob("*optim_states.pt"))
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    tag, passed_over = checkpoint.newest_verified(checkpoints)
    assert tag == "step-00000003" and any("step-00000006" in p and damaged.name in p for p in passed_over)
    (checkpoints / "step-00000003" / "meta.json").write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match="none of the 2 checkpoints"):
        checkpoint.newest_verified(checkpoints)


def test_a_training_set_of_one_class_is_warned_about_before_launch(tmp_path, caplog):
    from pipeline import stages
    from pipeline.config import load_config
    from pipeline.data import synthetic
    from pipeline.data.shards import write_shards

    circles = (s for s in synthetic.generate("shapes", 480, 16, seed=0) if s.label == 0)
    write_shards(circles, tmp_path / "shapes" / "train", classes=["circle"], max_count=8, progress=False)
    synthetic.write_dataset("shapes", tmp_path / "shapes" / "eval", samples=32, size=16, seed=1)
    cfg = load_config(TINY, [f"output_dir={tmp_path}/out", f"datasets.shapes.path={tmp_path}/shapes",
                             f"datasets.novel.path={tmp_path}/novel", "datasets.shapes.num_classes=1",
                             "datasets.shapes.generate=null"])  # fmt: skip
    with caplog.at_level("WARNING"):
        stages.prepare(cfg)
    assert "stage pretrain trains on one class (datasets.shapes.num_classes): it learns nothing" in caplog.text
    assert "finetune trains on one class" not in caplog.text
