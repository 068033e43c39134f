"""Dense -> GELU -> Dense with cuBLASLt's GELU epilogues (through nvmath-python): `model.fused_gelu`.

The forward pass computes the first matrix product, its bias and the GELU in one kernel (epilogue GELU_AUX_BIAS,
which also writes the GELU's input for the backward pass); the backward pass computes the gradient through the
second product and multiplies it by GELU' in one kernel (DGELU). Compiled PyTorch runs these as matrix products
followed by separate elementwise kernels, which read and write the (tokens x hidden) activation once more each.
cuBLASLt's GELU is the tanh approximation, so this path serves `model.gelu: tanh` only. Written by hand because no
library offers this MLP with a backward pass for PyTorch: `torch._addmm_activation` has the forward epilogue only,
and the libraries that have both (Transformer Engine) do not install here. The plain path (`models.mixer.mlp`) is
the reference, and what runs on the CPU.
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch

_PLANS: dict[tuple, object] = {}


def available() -> str | None:
    """Why the fused path cannot run on this machine (None when it can)."""
    if importlib.util.find_spec("nvmath") is None:
        return "nvmath-python is not installed (pip install '.[gpu]')"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


@cache
def _epilogs():
    from nvmath.linalg.advanced import MatmulEpilog

    return MatmulEpilog


def _matmul(a: torch.Tensor, b: torch.Tensor, epilog, inputs: dict) -> tuple[torch.Tensor, dict]:
    """`a @ b` with `epilog`, through a cuBLASLt plan made once per layout (shapes, strides, dtype, device) and
    autotuned then; later calls only point it at the new operands."""
    from nvmath.linalg.advanced import Matmul

    key = (epilog, a.shape, a.stride(), b.shape, b.stride(), a.dtype, a.device)
    mm = _PLANS.get(key)
    if mm is None:
        mm = Matmul(a, b)
        mm.plan(epilog=epilog, epilog_inputs=inputs)
        mm.autotune(iterations=3)
        _PLANS[key] = mm
    else:
        mm.reset_operands_unchecked(a=a, b=b, epilog_inputs=inputs)
    done = mm.execute()  # the result, or (result, auxiliary outputs) for epilogues that have some
    return done if isinstance(done, tuple) else (done, {})


def _aux_width(hidden: int) -> int:
    return -(-hidden // 8) * 8  # cuBLASLt pads the GELU input's rows to 8 elements


@torch.library.custom_op("mixer::dense_gelu", mutates_args=())
def dense_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, K), w (H, K), b (H,) -> (gelu(x w^T + b), x w^T + b), each (T, H) row-major.

    cuBLASLt's epilogues write column-major results and add a bias per row, so this computes the transpose,
    (w @ x^T) (H, T), whose column-major layout is the (T, H) row-major one wanted."""
    out, aux = _matmul(w, x.t(), _epilogs().GELU_AUX_BIAS, {"bias": b})
    return out.t(), aux["gelu_aux"].t()


@dense_gelu.register_fake
def _(x, w, b):
    return x.new_empty(x.shape[0], w.shape[0]), x.new_empty(x.shape[0], _aux_width(w.shape[0]))


@torch.library.custom_op("mixer::dgelu_dense", mutates_args=())
def dgelu_dense(g: torch.Tensor, w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """g (T, C), the gradient of `h w^T` with w (C, H); z (T, H'), the GELU's input -> dz = (g w) * gelu'(z), the
    gradient at the GELU's input. (DGELU only; the first bias's gradient is a separate sum. With that sum in the
    epilogue too, DGELU_BGRAD, cuBLASLt's kernel took 1.22 ms per call against 0.44 ms for this one: B/16, batch
    256, on an H200, docs/BENCHMARKS.md.)"""
    dz, _ = _matmul(w.t(), g.t(), _epilogs().DGELU, {"gelu_aux": z.t()})
    return dz.t()


@dgelu_dense.register_fake
def _(g, w, z):
    return g.new_empty(g.shape[0], w.shape[1])


class _GeluMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w0, b0, w1, b1):
        h, z = dense_gelu(x, w0, b0)
        ctx.save_for_backward(x, w0, w1, h, z)  # what autograd keeps for the plain path too: input, h, gelu input
        return torch.addmm(b1, h, w1.t())

    @staticmethod
    def backward(ctx, g):
        x, w0, w1, h, z = ctx.saved_tensors
        g = g.contiguous()
        dz = dgelu_dense(g, w1, z)
        return dz @ w0, dz.t() @ x, dz.sum(0), g.t() @ h, g.sum(0)


def gelu_mlp(y: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """Dense(w0, b0) -> tanh GELU -> Dense(w1, b1) over the last axis of y, on the GPU in bf16 (under autocast the
    operands are cast as autocast would cast them)."""
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else y.dtype
    lead = y.shape[:-1]
    with torch.autocast("cuda", enabled=False):
        x = y.reshape(-1, y.shape[-1]).to(dtype).contiguous()
        out = _GeluMlp.apply(x, w0.to(dtype), b0.to(dtype), w1.to(dtype), b1.to(dtype))
    return out.reshape(*lead, out.shape[-1])
