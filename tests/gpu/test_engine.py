"""The GPU training paths against eager ZeRO-2 bf16 on the same data and seed: ZeRO-3 compiled through DeepSpeed's
DeepCompile, and the float8 channel-mixing products. Each must learn, and its loss curve must stay with the
reference's (the same model and batches; only the kernels and their rounding differ)."""

import json

import pytest

from tests.gpu.conftest import curves_agree, run_gpu_config

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
TOLERANCE = 0.1  # relative, at every logged step; an untrained or diverging model is off by far more


@pytest.fixture(scope="module")
def reference(tmp_path_factory, gpu_shapes):
    run = run_gpu_config(tmp_path_factory.mktemp("reference"), "zero2", gpu_shapes)
    losses = run.losses()
    assert losses[max(losses)] < 0.8 * losses[min(losses)], losses  # the reference itself learns
    return losses


def test_zero3_through_deepcompile_trains_and_tracks_zero2(tmp_path, gpu_shapes, reference):
    run = run_gpu_config(tmp_path, "zero3", gpu_shapes, "deepspeed.zero_stage=3", "deepspeed.compile=true")
    ds = json.loads((run.stage / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["compile"]["deepcompile"] is True
    assert not curves_agree(run.losses(), reference, TOLERANCE)


def test_fp8_channel_mixing_trains_and_tracks_bf16(tmp_path, gpu_shapes, reference):
    run = run_gpu_config(tmp_path, "fp8", gpu_shapes, "deepspeed.fp8=tensorwise")
    assert not curves_agree(run.losses(), reference, TOLERANCE)
