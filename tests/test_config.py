import re

import pytest
import yaml

from pipeline.config import ConfigError, apply_override, dump_config, flatten, load_config, to_dict
from tests.conftest import REPO, run_mixer

DEMO = REPO / "configs" / "demo.yaml"


def write(tmp_path, data, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def demo_dict():
    return yaml.safe_load(DEMO.read_text())


def test_demo_config_loads_with_kind_defaults():
    cfg = load_config(DEMO)
    assert [s.name for s in cfg.stages] == ["pretrain", "finetune", "eval"]
    pretrain, finetune = cfg.stage("pretrain"), cfg.stage("finetune")
    assert pretrain.optim.name == "adamw" and pretrain.optim.schedule == "linear"
    assert pretrain.optim.betas == (0.9, 0.999)
    # Fine-tuning defaults: momentum SGD, cosine, no weight decay; the file only sets lr and warm-up.
    assert (finetune.optim.name, finetune.optim.schedule, finetune.optim.weight_decay) == ("sgd", "cosine", 0.0)
    assert finetune.optim.lr == 0.05


def test_unknown_key_is_named_with_the_file_and_a_suggestion(tmp_path):
    data = demo_dict()
    data["stages"][0]["optim"]["lrr"] = 0.1
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "stages[pretrain].optim.lrr" in message and str(path) in message and "'lr'" in message


def test_wrong_type_is_named(tmp_path):
    data = demo_dict()
    data["stages"][1]["steps"] = "many"
    with pytest.raises(ConfigError, match=r"stages\[finetune\]\.steps.*must be int"):
        load_config(write(tmp_path, data))


def test_bool_is_not_an_int(tmp_path):
    data = demo_dict()
    data["seed"] = True
    with pytest.raises(ConfigError, match="'seed' must be int"):
        load_config(write(tmp_path, data))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["stages"][2].pop("init_from"), "init_from' is required for an eval stage"),
        (lambda d: d["stages"][1].update(init_from="later"), "name an earlier stage"),
        (lambda d: d["stages"][0].update(dataset="imagenet"), "dataset' is 'imagenet'"),
        (lambda d: d["stages"][0].update(kind="distill"), "kind' is 'distill'"),
        (lambda d: d["model"].update(patch_size=5), "not a multiple of patch_size"),
        (lambda d: d["model"].pop("hidden_dim"), "model.hidden_dim' is required"),
        (lambda d: d["deepspeed"].update(zero_stage=4), "zero_stage' is 4"),
        (lambda d: d["model"].update(remat="all"), "model.remat' is 'all'"),
        (lambda d: d["deepspeed"].update(fp8="e4m3"), "deepspeed.fp8' is 'e4m3'"),
        (lambda d: d["model"].update(fused_gelu=True, gelu="exact"), "model.fused_gelu' needs model.gelu: tanh"),
        (
            lambda d: (d["model"].update(stacked=True), d["deepspeed"].update(fp8="rowwise")),
            "model.stacked' cannot be combined with deepspeed.fp8",
        ),
        (
            lambda d: (
                d["model"].update(stacked=False),
                d["deepspeed"].update(compile=True, compile_mode="max-autotune-no-cudagraphs"),
                d["stages"][1].update(zero_stage=3),
            ),
            r"stages\[finetune\] runs ZeRO-3 with deepspeed.compile, which compiles through DeepSpeed's DeepCompile",
        ),
        (lambda d: d["stages"].append(dict(d["stages"][0])), "two stages are named 'pretrain'"),
        (lambda d: d["data"].update(mode="sharded"), "data.mode' is 'sharded'"),
        (lambda d: d["data"].update(decode="npu"), "data.decode' is 'npu'"),
        (lambda d: d["data"].update(max_bad_fraction=2), "max_bad_fraction' must be between 0 and 1"),
        (lambda d: d["datasets"]["shapes"].update(sources=[{"url": "x", "weight": 0}]), r"sources\[0\].weight"),
    ],
)
def test_inconsistent_configs_are_refused(tmp_path, mutate, message):
    data = demo_dict()
    mutate(data)
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, data))


def test_stacked_blocks_run_under_every_zero_stage():
    """Compiled ZeRO-3 on GPUs goes through DeepCompile, which takes the stacked blocks' slices as views it tracks;
    elsewhere ZeRO-3 runs a stacked model eager (`engine.model_compile_mode`)."""
    cfg = load_config(DEMO, ["model.stacked=true", "deepspeed.zero_stage=3", "deepspeed.compile=true"])
    assert cfg.model.stacked and cfg.deepspeed.zero_stage == 3


def test_named_variant_fills_dimensions(tmp_path):
    data = demo_dict()
    data["model"] = {"variant": "B/16", "image_size": 224}
    spec = load_config(write(tmp_path, data)).model.spec()
    assert (spec.num_blocks, spec.patch_size, spec.hidden_dim, spec.num_patches) == (12, 16, 768, 196)


def test_overrides_address_stages_by_name_or_index():
    cfg = load_config(DEMO, ["stages.pretrain.steps=7", "stages.1.optim.lr=0.5", "output_dir=/tmp/x", "seed=3"])
    assert cfg.stage("pretrain").steps == 7
    assert cfg.stage("finetune").optim.lr == 0.5
    assert (cfg.output_dir, cfg.seed) == ("/tmp/x", 3)


def test_override_of_unknown_key_or_stage_fails():
    with pytest.raises(ConfigError, match="unknown key 'stages\\[pretrain\\].stepz'"):
        load_config(DEMO, ["stages.pretrain.stepz=1"])
    with pytest.raises(ConfigError, match="no such list item"):
        load_config(DEMO, ["stages.warmup.steps=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_override({}, "seed")


def test_dump_and_reload_round_trips(tmp_path):
    cfg = load_config(DEMO, ["output_dir=/tmp/out"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_flatten_keys_stages_by_name():
    flat = flatten(to_dict(load_config(DEMO)))
    assert flat["stages.finetune.optim.name"] == "sgd"
    assert flat["model.hidden_dim"] == 128


def test_cli_refuses_a_misspelt_key_before_starting_anything(tmp_path):
    data = demo_dict()
    data["stages"][0]["micro_bach"] = 32
    path = write(tmp_path, data)
    out = tmp_path / "out"
    result = run_mixer("run", str(path), f"output_dir={out}")
    assert result.returncode == 2
    assert "stages[pretrain].micro_bach" in result.stderr and "micro_batch" in result.stderr
    assert not out.exists()  # nothing was prepared, no process was launched


# --------------------------------------------------------------------------- ranks per node


@pytest.mark.parametrize(("gpus", "ranks"), [(0, 2), (1, 1), (8, 8)])
def test_auto_ranks_are_one_per_gpu_and_two_without_one(gpus, ranks):
    """The demo's `launch.nproc_per_node: auto` on a CPU machine, a 1-GPU and an 8-GPU machine."""
    cfg = load_config(DEMO, gpus=gpus)
    assert cfg.launch.nproc_per_node == ranks
    assert load_config(DEMO, ["launch.device=cpu"], gpus=gpus).launch.nproc_per_node == 2  # CPU ranks asked for


def test_auto_ranks_on_this_machine_follow_its_cuda_devices(tmp_path):
    import torch

    gpus = torch.cuda.device_count()
    assert load_config(DEMO).launch.nproc_per_node == (gpus or 2)
    out = tmp_path / "out"
    assert run_mixer("run", str(DEMO), "--dry-run", f"output_dir={out}").returncode == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["launch"]["nproc_per_node"] == (gpus or 2)


def test_more_ranks_than_gpus_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["launch.nproc_per_node=2"], gpus=1)
    message = str(err.value)
    assert "'launch.nproc_per_node' is 2" in message and "1 GPU" in message
    assert "launch.nproc_per_node=1" in message and str(DEMO) in message
    assert load_config(DEMO, ["launch.nproc_per_node=4"], gpus=8).launch.nproc_per_node == 4  # fewer is allowed
    with pytest.raises(ConfigError, match="'launch.device' is cuda but this machine has no visible CUDA device"):
        load_config(DEMO, ["launch.device=cuda"], gpus=0)
    with pytest.raises(ConfigError, match="'launch.nproc_per_node' must be int or 'auto', got 'all'"):
        load_config(DEMO, ["launch.nproc_per_node=all"], gpus=0)


def test_cluster_gpus_and_ranks_per_node_agree_or_are_refused():
    assert load_config(DEMO, ["cluster.gpus_per_node=8"], gpus="cluster").launch.nproc_per_node == 8
    assert load_config(DEMO, gpus="cluster").launch.nproc_per_node == 2  # a CPU-only cluster
    with pytest.raises(ConfigError, match="'launch.nproc_per_node' is 4 but 'cluster.gpus_per_node' is 8"):
        load_config(DEMO, ["launch.nproc_per_node=4", "cluster.gpus_per_node=8"], gpus="cluster")
    bad_stage = ["launch.nproc_per_node=8", "cluster.gpus_per_node=8", "cluster.stages={eval: {gpus_per_node: 4}}"]
    with pytest.raises(ConfigError, match="'cluster.stages.eval.gpus_per_node' is 4"):
        load_config(DEMO, bad_stage, gpus="cluster")


def test_header_is_read_and_kept_above_the_resolved_config(tmp_path):
    from pipeline.config import read_header

    header = read_header(DEMO)
    assert header.startswith("The demo: procedural shapes") and "Command:" in header and "Expected:" in header
    dump_config(load_config(DEMO), tmp_path / "resolved.yaml", header)
    assert read_header(tmp_path / "resolved.yaml") == header
    assert load_config(tmp_path / "resolved.yaml").stages[0].name == "pretrain"  # comments do not disturb the YAML


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("stages.pretrain.optim.lr=-1", "optim.lr"),
        ("stages.pretrain.optim.lr=.nan", "optim.lr"),
        ("stages.pretrain.optim.warmup_steps=-5", "optim.warmup_steps"),
        ("stages.pretrain.dropout=1.5", "dropout"),
        ("stages.pretrain.stoch_depth=2", "stoch_depth"),
        ("stages.pretrain.augment.mixup=-1", "augment.mixup"),
        ("stages.pretrain.checkpoint_every=-3", "checkpoint_every"),
        ("stages.pretrain.optim.weight_decay=-0.1", "optim.weight_decay"),
        ("stages.pretrain.augment.crop_scale=[0.9, 0.1]", "augment.crop_scale"),
        ("stages.pretrain.optim.betas=[0.9, 1.0]", "optim.betas[1]"),
        ("stages.finetune.image_size=50", "image_size"),
    ],
)
def test_out_of_range_settings_are_refused_naming_the_key(override, key):
    stage = override.split(".")[1]
    with pytest.raises(ConfigError, match=rf"'stages\[{stage}\]\.{re.escape(key)}'"):
        load_config(DEMO, [override])


def test_an_output_folder_that_cannot_be_written_is_refused_before_launch(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_mixer("run", str(DEMO), f"output_dir={blocker}/out")
    assert result.returncode == 2 and "'output_dir'" in result.stderr and "Traceback" not in result.stderr
