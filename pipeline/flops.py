"""Exact Mixer FLOPs (matmuls only) and the peak rates MFU is measured against.

MFU = images/s x training FLOPs per image / peak FLOP/s. A training step costs 3 forward passes (forward, and the
two products of the backward pass); 1 multiply-accumulate = 2 FLOP. The 6·N·tokens rule undercounts Mixer because
the token-mixing weights are applied once per channel.
"""

from __future__ import annotations

import time

import torch

from pipeline.models.mixer import MixerSpec

# Dense (no sparsity) tensor-core peaks from the vendors' datasheets, by device-name fragment; first match wins.
PEAK_FLOPS: list[tuple[str, torch.dtype, float]] = [
    ("H100 PCIe", torch.bfloat16, 756e12),
    ("H100", torch.bfloat16, 989.4e12),
    ("H200", torch.bfloat16, 989.4e12),
    ("A100", torch.bfloat16, 312e12),
    ("H100 PCIe", torch.float32, 51e12),
    ("H100", torch.float32, 66.9e12),
    ("H200", torch.float32, 66.9e12),
    ("A100", torch.float32, 19.5e12),
]


def forward_macs(spec: MixerSpec, num_classes: int = 0) -> int:
    """Multiply-accumulates of one image's forward pass: stem, token and channel mixing, head."""
    s, c, p = spec.num_patches, spec.hidden_dim, spec.patch_size
    stem = s * c * 3 * p * p
    token = 2 * c * s * spec.tokens_mlp_dim  # two dense layers over S, once per channel
    channel = 2 * s * c * spec.channels_mlp_dim  # two dense layers over C, once per patch
    return stem + spec.num_blocks * (token + channel) + c * num_classes


def train_flops_per_image(spec: MixerSpec, num_classes: int = 0) -> float:
    return 3 * 2 * forward_macs(spec, num_classes)


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, bool]:
    """(peak FLOP/s, estimated?). Known GPUs come from the table; anything else is measured here and then."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, table_dtype, value in PEAK_FLOPS:
            if fragment in name and table_dtype == dtype:
                return value, False
    return measure_matmul_flops(device, dtype), True


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """The rate of a large square matrix product: the practical ceiling for Mixer's matmuls."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 2):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    best = sorted(times[2:])[len(times[2:]) // 2]  # median after two warm-ups
    return 2 * size**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
