import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from deepspeed.runtime import utils as ds_utils

from pipeline import engine_patches
from pipeline.engine_patches import PATCHES, _mask_non_finite, keep_persistent_reductions, plain_arch_list, why_not
from tests.conftest import REPO


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_every_deepspeed_function_a_patch_reaches_has_the_signature_it_was_tested_with(patch):
    # Fails when an installed DeepSpeed renames or changes one of them: the patch would then stand down (below)
    assert why_not(patch) is None


def test_a_changed_signature_or_an_untested_release_makes_a_patch_stand_down(monkeypatch):
    patch = PATCHES[0]
    (dotted,) = patch.reaches
    changed = dataclasses.replace(patch, reaches={dotted: "(input, val=-1.0)"})
    assert why_not(changed) == (
        f"DeepSpeed {engine_patches.deepspeed_version()}'s {dotted} is (input, device=None, val=-1.0), tested as "
        "(input, val=-1.0)"
    )
    gone = dataclasses.replace(patch, reaches={dotted + "_renamed": "(input)"})
    assert "has no deepspeed.runtime.zero.stage_1_and_2.mask_nan_or_inf_with_val_inplace_renamed" in why_not(gone)
    monkeypatch.setattr(engine_patches, "deepspeed_version", lambda: "0.20.1")
    assert why_not(patch) == "DeepSpeed 0.20.1 is outside the tested releases (<0.20,>=0.19.8)"


# One rank (gloo) builds a ZeRO-2 engine and takes a step on a DeepSpeed release outside the tested range, then on
# the installed one; prints what was patched.
_STOCK_THEN_PATCHED = textwrap.dedent(
    """
    import logging, sys
    import torch, torch.nn.functional as F
    from deepspeed.runtime.zero import stage3, stage_1_and_2
    from pipeline import engine, engine_patches
    from pipeline.config import DeepSpeedConfig, OptimConfig, StageConfig
    from pipeline.dist import init_process_group, read_env
    from pipeline.models.mixer import MixerSpec, MlpMixer

    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(name)s: %(message)s")
    stock = {f: getattr(stage_1_and_2, f) for f in ("is_invalid_grad_norm", "mask_nan_or_inf_with_val_inplace")}
    print("import:", all(f.__module__.startswith("deepspeed.") for f in stock.values()))
    init_process_group(read_env("cpu"))
    stage = StageConfig(name="p", kind="pretrain", dataset="d", steps=10, micro_batch=2, optim=OptimConfig(lr=0.1))
    config = engine.build_config(stage, DeepSpeedConfig(zero_stage=2), 1, torch.device("cpu"))

    def one_step(version):
        engine_patches.deepspeed_version = lambda: version
        ds = engine.build_engine(MlpMixer(MixerSpec(2, 4, 16, 8, 32, 16), num_classes=3), stage, config)
        for _ in range(2):
            ds.backward(F.cross_entropy(ds(torch.randn(2, 3, 16, 16)), torch.tensor([0, 2])))
            ds.step()
        same = [getattr(stage_1_and_2, f) is g for f, g in stock.items()]
        print(version, "skip on device:", hasattr(ds, "skipped_on_device"), "stock functions:", same)

    one_step("0.21.0")
    one_step(engine_patches.deepspeed.__version__)
    """
)


@pytest.mark.slow
def test_importing_patches_nothing_and_an_untested_deepspeed_trains_stock():
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "PYTHONPATH": str(REPO)}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        [sys.executable, "-c", _STOCK_THEN_PATCHED], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "import: True" in lines
    assert "0.21.0 skip on device: False stock functions: [True, True]" in lines
    notices = [line for line in lines if line.startswith("pipeline.engine_patches: DeepSpeed runs stock here")]
    # one line per patch that an engine consults, naming the release and the tested range
    assert len(notices) == 3 and all("DeepSpeed 0.21.0 is outside the tested releases" in n for n in notices)
    installed = engine_patches.deepspeed.__version__
    assert f"{installed} skip on device: True stock functions: [False, False]" in lines


def test_deepcompile_keeps_persistent_reductions_but_not_mix_order_ones():
    # DeepSpeed's own module-level settings, read when DeepCompile compiles: fails if the installed DeepSpeed has
    # renamed them (the engine then leaves DeepCompile's settings as they are)
    assert keep_persistent_reductions() == {"triton.mix_order_reduction": False}


def test_deepcompiles_op_builder_takes_an_architecture_specific_arch_list(monkeypatch):
    """A CUDA image's TORCH_CUDA_ARCH_LIST="9.0a" stopped DeepCompile's op build on an H200 machine; DeepSpeed's
    own builder reads the list here as it does there (it fails on the CPU the same way, before looking for GPUs)."""
    from deepspeed.ops.op_builder.dc import DeepCompileBuilder

    builder = DeepCompileBuilder()
    builder.jit_mode = True
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a 10.0f+PTX")
    with pytest.raises(ValueError, match="invalid literal for int"):
        builder.compute_capability_args()
    assert plain_arch_list() == "8.0;9.0 10.0+PTX" == os.environ["TORCH_CUDA_ARCH_LIST"]
    builder.compute_capability_args()  # no error now
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert plain_arch_list() == "9.0"


def test_the_sync_free_norm_mask_matches_deepspeeds():
    norm = torch.tensor([1.5, float("inf"), float("nan"), -float("inf"), 0.0])
    expected = norm.clone()
    ds_utils.mask_nan_or_inf_with_val_inplace(expected)
    _mask_non_finite(norm)
    assert torch.equal(norm, expected) and norm.tolist() == [1.5, -1.0, -1.0, -1.0, 0.0]
