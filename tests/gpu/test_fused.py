"""`model.fused_gelu`: the channel-mixing MLP through cuBLASLt's GELU epilogues against the plain path (the
reference, what the CPU runs), on the same bf16 values: outputs and every gradient agree to bf16 rounding, alone,
inside a compiled model under autocast (its patch axis padded or not), and in a training run."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.fused import available, gelu_mlp
from pipeline.models.mixer import MixerSpec, MlpMixer, mlp
from tests.gpu.conftest import curves_agree, run_gpu_config

pytestmark = pytest.mark.gpu
TANH = torch.nn.GELU(approximate="tanh")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.fixture(autouse=True)
def _fused_path():
    assert available() is None, available()  # the GPU lane installs nvmath-python


def test_the_fused_mlp_matches_the_plain_one_with_its_gradients():
    torch.manual_seed(0)
    shapes = {"y": (8, 50, 256), "w0": (1024, 256), "b0": (1024,), "w1": (256, 1024), "b1": (256,)}
    leaves = {k: (torch.randn(s, device="cuda") * 0.5).bfloat16().requires_grad_() for k, s in shapes.items()}
    grad = torch.randn(8, 50, 256, device="cuda").bfloat16()
    fused = gelu_mlp(*leaves.values())
    fused.backward(grad)
    got = {k: v.grad.clone() for k, v in leaves.items()}
    for v in leaves.values():
        v.grad = None
    # The reference in fp32 from the same bf16 values
    plain = mlp(*(v.float() for v in leaves.values()), act=TANH)
    plain.backward(grad.float())
    assert fused.dtype == torch.bfloat16 and fused.shape == plain.shape
    assert _relative(fused, plain) < 1e-2
    for name, value in leaves.items():
        assert _relative(got[name], value.grad) < 2e-2, name


@pytest.mark.parametrize("image", [64, 56], ids=["64 patches", "49 patches padded to 64"])
def test_a_compiled_model_with_the_fused_mlp_matches_the_plain_model_under_autocast(image):
    spec = MixerSpec(2, 8, 128, 64, 512, image)
    assert (spec.num_patches % 16 != 0) == (image == 56)  # 49 patches: the token-mixing MLP runs padded
    torch.manual_seed(0)
    plain = MlpMixer(spec, 10, gelu="tanh", stacked=True).cuda()
    torch.nn.init.normal_(plain.head.weight, std=0.02)  # a zero head would give every block a zero gradient
    fused = MlpMixer(spec, 10, gelu="tanh", stacked=True, fused_gelu=True).cuda()
    fused.load_state_dict(plain.state_dict())
    images = torch.randn(16, 3, image, image, device="cuda")
    labels = torch.randint(0, 10, (16,), device="cuda")
    results = []
    for model in (plain, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = torch.compile(model)(images)
        F.cross_entropy(logits.float(), labels).backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    assert _relative(got, want) < 2e-2
    # Errors relative to each gradient, or to a hundredth of the largest where a gradient is zero but for rounding:
    # the token-mixing output bias's, since every use of the residual stream normalises it over channels.
    floor = 1e-2 * max(g.float().norm() for g in want_grads.values())
    for name, value in want_grads.items():
        error = (got_grads[name].float() - value.float()).norm()
        assert error < 5e-2 * max(value.float().norm(), floor), (name, error, value.norm())


@pytest.mark.slow
def test_fused_gelu_trains_as_the_plain_tanh_gelu_does(tmp_path, gpu_shapes):
    common = ("model.gelu=tanh", "model.stacked=true", "deepspeed.precision=autocast", "deepspeed.compile=true")
    plain = run_gpu_config(tmp_path, "plain", gpu_shapes, *common).losses()
    fused = run_gpu_config(tmp_path, "fused", gpu_shapes, *common, "model.fused_gelu=true").losses()
    assert plain[max(plain)] < 0.9 * plain[min(plain)], plain  # it learns: off ln(8) by step 100
    assert not curves_agree(fused, plain, 0.1), (fused, plain)
