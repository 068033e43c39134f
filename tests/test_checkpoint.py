import numpy as np
import pytest
import torch

from pipeline import weights
from pipeline.checkpoint import CheckpointError, check_compatible, check_reshardable, init_weights, stage_specs
from pipeline.config import ConfigError, load_config
from pipeline.models.mixer import MixerSpec, MlpMixer
from tests.conftest import REPO

TINY = REPO / "tests" / "configs" / "tiny.yaml"


def test_stage_specs_follow_the_chain_and_grow_by_integer_factors():
    specs = stage_specs(load_config(TINY, ["stages.finetune.image_size=48"]))
    assert specs["pretrain"].image_size == 16 and specs["pretrain"].tokens_mlp_dim == 16
    assert specs["finetune"] == specs["pretrain"].grown(3)
    assert specs["eval"] == specs["finetune"]  # the eval stage inherits its source's shape


@pytest.mark.parametrize("size", [24, 8, 20])
def test_non_integer_growth_is_refused_with_the_rule(size):
    with pytest.raises(ConfigError, match=r"integer factor K .*S' = K\^2 S"):
        stage_specs(load_config(TINY, [f"stages.finetune.image_size={size}"]))


def test_init_from_an_official_npz_grows_to_the_stage_resolution(tmp_path):
    spec = MixerSpec(num_blocks=2, patch_size=4, hidden_dim=8, tokens_mlp_dim=4, channels_mlp_dim=16, image_size=16)
    torch.manual_seed(0)
    source = MlpMixer(spec, num_classes=3)
    weights.write_npz(source.state_dict(), tmp_path / "src.npz")
    model = MlpMixer(spec.grown(2), num_classes=7)
    init_weights(model, tmp_path / "src.npz", new_head=True)
    assert torch.equal(model.blocks[1].channel_mixing.dense_0.weight, source.blocks[1].channel_mixing.dense_0.weight)
    w = model.blocks[0].token_mixing.dense_0.weight  # (4 * D_S, 4 * S), block-diagonal copies
    assert w.shape == (16, 64) and torch.count_nonzero(w) == 4 * (4 * 16)
    assert torch.count_nonzero(model.head.weight) == 0  # the new head stays zero
    npz_state = np.load(tmp_path / "src.npz")
    assert npz_state["MixerBlock_0/token_mixing/Dense_0/kernel"].shape == (16, 4)
    stacked = MlpMixer(spec.grown(2), num_classes=7, stacked=True)  # the same file, grown, into stacked blocks
    init_weights(stacked, tmp_path / "src.npz", new_head=True)
    expected = model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in stacked.state_dict().items())


def test_a_checkpoint_resumes_only_under_the_parameter_layout_that_wrote_it():
    fingerprint = {"model": {"num_blocks": 2}, "zero_stage": 2}
    check_compatible(fingerprint, {**fingerprint, "stacked": False})  # older checkpoints: per-block
    check_compatible({**fingerprint, "stacked": True}, {**fingerprint, "stacked": True})
    with pytest.raises(CheckpointError, match="stacked: checkpoint False, config True"):
        check_compatible(fingerprint, {**fingerprint, "stacked": True})
    with pytest.raises(CheckpointError, match="stacked: checkpoint True, config False"):
        check_compatible({**fingerprint, "stacked": True}, {**fingerprint, "stacked": False})


def test_weights_of_another_shape_are_refused(tmp_path):
    spec = MixerSpec(num_blocks=2, patch_size=4, hidden_dim=8, tokens_mlp_dim=4, channels_mlp_dim=16, image_size=16)
    weights.write_npz(MlpMixer(spec, num_classes=3).state_dict(), tmp_path / "src.npz")
    other = MlpMixer(MixerSpec(3, 4, 8, 4, 16, 16), num_classes=3)
    with pytest.raises(ValueError, match="do not fit the model"):
        init_weights(other, tmp_path / "src.npz", new_head=False)


def test_a_stage_reads_no_later_stage_source():
    """A stage's ranks resolve only the chain up to their own stage, not later stages' weights files."""
    cfg = load_config(TINY, ["stages.eval.init_from=/nonexistent/later.npz"])
    assert list(stage_specs(cfg, upto="finetune")) == ["pretrain", "finetune"]
    with pytest.raises(FileNotFoundError):
        stage_specs(cfg)


def test_a_world_size_change_is_refused_where_the_universal_conversion_is_not_exact():
    check_reshardable(2, 2, "sgd", 3)  # same number of ranks: DeepSpeed loads its own shards
    check_reshardable(2, 3, "adamw", 2)
    with pytest.raises(
        CheckpointError, match="written by 2 ranks, this job has 1.*only Adam's .* resume this stage on 2"
    ):
        check_reshardable(2, 1, "sgd", 2)
    with pytest.raises(CheckpointError, match="ZeRO-3 .* resume this stage on 4 ranks"):
        check_reshardable(4, 2, "adamw", 3)
