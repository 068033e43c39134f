"""The paper's recipes in configs/paper/ validate, start with their header, and keep their global batch."""

import pytest

from pipeline.config import ConfigError, load_config
from tests.conftest import REPO, run_mixer

RECIPES = sorted((REPO / "configs" / "paper").glob("*.yaml"))


def test_there_are_three_recipes():
    assert [p.stem for p in RECIPES] == ["mixer_b16_i1k", "mixer_h14_jft_ft448", "mixer_l16_i21k_ft448"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_names_command_hardware_and_expected_result(path):
    header = [line for line in path.read_text().splitlines() if line.startswith("#")][:12]
    text = "\n".join(header)
    for word in ("Command:", "mixer run configs/paper/", "Hardware:", "Expected:"):
        assert word in text, f"{path.name} header lacks {word!r}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_dry_run_prints_the_plan_without_starting_anything(path, tmp_path):
    result = run_mixer("run", str(path), "--dry-run", f"output_dir={tmp_path}/out")
    assert result.returncode == 0, result.stderr
    assert "global batch 4096 = " in result.stdout
    assert '"train_batch_size": 4096' in result.stdout
    assert not (tmp_path / "out" / "stages").exists()  # no stage ran


def test_b16_recipe_is_the_papers():
    cfg = load_config(REPO / "configs" / "paper" / "mixer_b16_i1k.yaml")
    stage = cfg.stage("pretrain")
    assert (cfg.model.variant, stage.optim.lr, stage.optim.weight_decay, stage.optim.warmup_steps) == (
        "B/16",
        1e-3,
        0.1,
        10000,
    )
    assert (stage.augment.randaugment_magnitude, stage.augment.mixup, stage.stoch_depth) == (15, 0.5, 0.1)
    assert stage.steps == 93836 and stage.optim.schedule == "linear"


def test_fine_tune_at_448_grows_the_token_mixing(tmp_path):
    result = run_mixer(
        "run", str(REPO / "configs" / "paper" / "mixer_l16_i21k_ft448.yaml"), "--dry-run", f"output_dir={tmp_path}/out"
    )
    assert "448px, S=784, C=1024, D_S=2048" in result.stdout


@pytest.mark.parametrize(("nnodes", "accumulation"), [(8, 2), (4, 4), (2, 8), (1, 16)])
def test_global_batch_is_kept_when_the_world_size_changes(nnodes, accumulation):
    cfg = load_config(REPO / "configs" / "paper" / "mixer_l16_i21k_ft448.yaml", [f"launch.nnodes={nnodes}"], gpus=8)
    stage = cfg.stage("pretrain")
    world = 8 * nnodes
    assert stage.accumulation(world) == accumulation
    assert stage.micro_batch * stage.accumulation(world) * world == 4096


def test_global_batch_that_cannot_be_split_is_refused():
    with pytest.raises(ConfigError, match="global_batch 4096 is not a multiple of micro_batch 32 x 24 ranks"):
        load_config(REPO / "configs" / "paper" / "mixer_l16_i21k_ft448.yaml", ["launch.nnodes=3"], gpus=8)
    with pytest.raises(ConfigError, match="set grad_accum or global_batch, not both"):
        load_config(REPO / "configs" / "paper" / "mixer_b16_i1k.yaml", ["stages.pretrain.grad_accum=2"])
