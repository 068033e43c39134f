from dataclasses import replace

import pytest
import torch

from pipeline.flops import forward_macs, peak_flops, train_flops_per_image
from pipeline.models.mixer import VARIANTS, MlpMixer


@pytest.mark.parametrize(
    ("name", "gmac", "train_gflop"), [("B/16", 12.60, 75.6), ("L/16", 44.55, 267.3), ("H/14", 120.99, 725.9)]
)
def test_exact_mixer_flops_match_the_paper(name, gmac, train_gflop):
    spec = VARIANTS[name]
    assert round(forward_macs(spec) / 1e9, 2) == gmac
    assert round(train_flops_per_image(spec) / 1e9, 1) == train_gflop


def test_macs_count_every_matmul_of_the_model():
    """The formula agrees with torch's own FLOP counter on the real module (matmuls and the stem conv). MFU counts
    the model's FLOPs: the zero tokens that pad token mixing to 16-aligned rows are work the GPU does on top."""
    from torch.utils.flop_counter import FlopCounterMode

    for spec in (replace(VARIANTS["S/32"], image_size=256), VARIANTS["S/32"]):  # S = 64: no padding; S = 49: 15
        model = MlpMixer(spec, num_classes=10)
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(1, 3, spec.image_size, spec.image_size))
        pad = model.blocks[0].token_pad
        padding_macs = spec.num_blocks * 2 * spec.hidden_dim * spec.tokens_mlp_dim * pad
        assert counter.get_total_flops() == 2 * (forward_macs(spec, num_classes=10) + padding_macs)
    assert pad == 15


def test_unknown_devices_get_an_estimated_peak():
    value, estimated = peak_flops(torch.device("cpu"), torch.float32)
    assert estimated and value > 1e8
