"""Official .npz, big_vision and timm layouts -> our names, tensor by tensor; forward equal to timm's MlpMixer."""

import numpy as np
import pytest
import torch
from timm.models.mlp_mixer import MlpMixer as TimmMixer

from pipeline import weights
from pipeline.checkpoint import load_exported
from tests.conftest import run_mixer

# A small Mixer: P=4, C=12, S=(16/4)^2=16, D_S=6, D_C=24, 2 blocks, 5 classes.
P, C, S, D_S, D_C, N, K = 4, 12, 16, 6, 24, 2, 5


def official_arrays(seed=0):
    rng = np.random.default_rng(seed)
    a = {"stem/kernel": rng.normal(size=(P, P, 3, C)), "stem/bias": rng.normal(size=C)}
    for i in range(N):
        b = f"MixerBlock_{i}"
        for ln in ("LayerNorm_0", "LayerNorm_1"):
            a[f"{b}/{ln}/scale"], a[f"{b}/{ln}/bias"] = rng.normal(size=C), rng.normal(size=C)
        # Flax kernels are (in, out).
        for mlp, k, fan_in, fan_out in [
            ("token_mixing", 0, S, D_S),
            ("token_mixing", 1, D_S, S),
            ("channel_mixing", 0, C, D_C),
            ("channel_mixing", 1, D_C, C),
        ]:
            a[f"{b}/{mlp}/Dense_{k}/kernel"] = rng.normal(size=(fan_in, fan_out))
            a[f"{b}/{mlp}/Dense_{k}/bias"] = rng.normal(size=fan_out)
    a["pre_head_layer_norm/scale"], a["pre_head_layer_norm/bias"] = rng.normal(size=C), rng.normal(size=C)
    a["head/kernel"], a["head/bias"] = rng.normal(size=(C, K)), rng.normal(size=K)
    return {k: v.astype(np.float32) for k, v in a.items()}


def t(x):
    return torch.from_numpy(x)


@pytest.mark.parametrize("prefix", ["", "params/", "opt/target/"])
def test_official_npz_maps_tensor_by_tensor(tmp_path, prefix):
    arrays = official_arrays()
    np.savez(tmp_path / "m.npz", **{prefix + k: v for k, v in arrays.items()})
    w = weights.read_npz(tmp_path / "m.npz")
    assert (w.spec.patch_size, w.spec.hidden_dim, w.spec.num_patches, w.spec.tokens_mlp_dim) == (P, C, S, D_S)
    assert (w.spec.channels_mlp_dim, w.spec.num_blocks, w.spec.image_size, w.num_classes) == (D_C, N, 16, K)
    assert w.gelu == "tanh"
    s = w.state
    assert torch.equal(s["stem.weight"], t(arrays["stem/kernel"]).permute(3, 2, 0, 1))  # HWIO -> OIHW
    assert torch.equal(s["stem.bias"], t(arrays["stem/bias"]))
    for i in range(N):
        b = f"MixerBlock_{i}"
        assert torch.equal(s[f"blocks.{i}.token_norm.weight"], t(arrays[f"{b}/LayerNorm_0/scale"]))
        assert torch.equal(s[f"blocks.{i}.channel_norm.bias"], t(arrays[f"{b}/LayerNorm_1/bias"]))
        for mlp in ("token_mixing", "channel_mixing"):
            for k in (0, 1):
                kernel = t(arrays[f"{b}/{mlp}/Dense_{k}/kernel"])
                assert torch.equal(s[f"blocks.{i}.{mlp}.dense_{k}.weight"], kernel.T)  # (in, out) -> (out, in)
                assert torch.equal(s[f"blocks.{i}.{mlp}.dense_{k}.bias"], t(arrays[f"{b}/{mlp}/Dense_{k}/bias"]))
    assert torch.equal(s["pre_head_norm.weight"], t(arrays["pre_head_layer_norm/scale"]))
    assert torch.equal(s["head.weight"], t(arrays["head/kernel"]).T)


def test_npz_export_round_trips_to_the_official_layout(tmp_path):
    arrays = official_arrays(1)
    np.savez(tmp_path / "a.npz", **arrays)
    weights.write_npz(weights.read_npz(tmp_path / "a.npz").state, tmp_path / "b.npz")
    with np.load(tmp_path / "b.npz") as again:
        assert sorted(again.files) == sorted(arrays)
        for key, value in arrays.items():
            np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_not_a_mixer_npz_is_refused(tmp_path):
    np.savez(tmp_path / "x.npz", embedding=np.zeros(3))
    with pytest.raises(ValueError, match="not a Mixer checkpoint"):
        weights.read_npz(tmp_path / "x.npz")


def timm_model():
    torch.manual_seed(0)
    model = TimmMixer(
        num_classes=K, img_size=16, patch_size=P, num_blocks=N, embed_dim=C, mlp_ratio=(D_S / C, D_C / C)
    ).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)  # non-zero head and biases, so every tensor matters
    return model


def test_timm_state_dict_gives_the_same_forward_pass(tmp_path):
    reference = timm_model()
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    ours = load_exported(tmp_path / "timm.pth").eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        diff = (ours(x) - reference(x)).abs().max().item()
    assert diff <= 1e-5


def test_timm_to_npz_and_back_keeps_the_forward_pass(tmp_path):
    reference = timm_model()
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    result = run_mixer("weights", "export", str(tmp_path / "timm.pth"), str(tmp_path / "m.npz"))
    assert result.returncode == 0, result.stderr
    result = run_mixer("weights", "import", str(tmp_path / "m.npz"), str(tmp_path / "m.safetensors"))
    assert result.returncode == 0, result.stderr
    model = load_exported(tmp_path / "m.safetensors")  # npz says "tanh": force timm's exact GELU to compare
    exact = load_exported(tmp_path / "timm.pth")
    exact.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (exact.eval()(x) - reference(x)).abs().max().item() <= 1e-5
