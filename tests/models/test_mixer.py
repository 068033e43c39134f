import pytest
import torch

from pipeline.models.mixer import VARIANTS, MixerSpec, MlpMixer, count_params

# Table 1 of the paper, millions of parameters without the head, at 224x224.
TABLE_1 = {"S/32": 19, "S/16": 18, "B/32": 60, "B/16": 59, "L/32": 206, "L/16": 207, "H/14": 431}
TINY = MixerSpec(num_blocks=2, patch_size=4, hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=32, image_size=16)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_parameter_counts_match_table_1(name):
    with torch.device("meta"):
        model = MlpMixer(VARIANTS[name], num_classes=1000)
    assert round(count_params(model) / 1e6) == TABLE_1[name]
    assert count_params(model, include_head=True) - count_params(model) == 1000 * VARIANTS[name].hidden_dim + 1000


@pytest.mark.parametrize("name", ["S/32", "B/32"])
def test_named_variant_forward_shapes(name):
    spec = MixerSpec(**{**VARIANTS[name].__dict__, "image_size": 64})
    model = MlpMixer(spec, num_classes=7)
    images = torch.randn(2, 3, 64, 64)
    assert model.features(images).shape == (2, spec.hidden_dim)
    assert model(images).shape == (2, 7)


def test_head_is_zero_initialised_so_initial_logits_are_zero():
    model = MlpMixer(TINY, num_classes=5)
    assert torch.count_nonzero(model(torch.randn(3, 3, 16, 16))) == 0


def test_token_mixing_width_follows_patch_count():
    block = MlpMixer(TINY, num_classes=2).blocks[0]
    assert block.token_mixing.dense_0.weight.shape == (TINY.tokens_mlp_dim, TINY.num_patches)
    assert block.channel_mixing.dense_0.weight.shape == (TINY.channels_mlp_dim, TINY.hidden_dim)


def test_patches_are_mixed_only_through_token_mixing():
    """Zeroing the token-mixing output makes every patch's features independent of the other patches."""
    torch.manual_seed(0)
    model = MlpMixer(TINY, num_classes=2).eval()
    for block in model.blocks:
        torch.nn.init.zeros_(block.token_mixing.dense_1.weight)
        torch.nn.init.zeros_(block.token_mixing.dense_1.bias)
    a = torch.randn(1, 3, 16, 16)
    b = a.clone()
    b[..., :4, :4] = torch.randn(3, 4, 4)  # change one patch only
    tokens = lambda x: model.stem(x).flatten(2).transpose(1, 2)  # noqa: E731
    xa, xb = tokens(a), tokens(b)
    for block in model.blocks:
        xa, xb = block(xa), block(xb)
    assert torch.allclose(xa[:, 1:], xb[:, 1:])
    assert not torch.allclose(xa[:, 0], xb[:, 0])


def test_stochastic_depth_rises_linearly_and_is_off_in_eval():
    model = MlpMixer(MixerSpec(5, 4, 16, 8, 32, 16), num_classes=2, stoch_depth=0.2)
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.features(x), model.features(x))


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        MlpMixer(MixerSpec(2, 5, 16, 8, 32, 16), num_classes=2)
