"""Every change the pipeline makes to DeepSpeed's own behaviour (and to the Inductor settings DeepCompile picks).

Nothing here runs on import: `engine.build_engine` applies the patches, `before_deepcompile` before DeepCompile
compiles and `apply` once the engine exists. Each reaches into DeepSpeed functions that `PATCHES` names with their
signatures as tested, and runs only on the DeepSpeed releases in `TESTED_DEEPSPEED` whose signatures still match;
otherwise DeepSpeed runs stock (the same training, with the host waits these remove) and one line says which patch
stood down and why. tests/test_engine_patches.py fails when an installed DeepSpeed changes a patched signature.

What is not here, because it is no patch: `engine.SafeCheckpointEngine` (DeepSpeed's public checkpoint-engine
hook, and a safety rule that must not stand down on any release) and the DeepSpeed config `engine.build_config`
writes.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

log = logging.getLogger(__name__)

# The DeepSpeed releases these patches were tested with (pyproject.toml admits the same range).
TESTED_DEEPSPEED = SpecifierSet(">=0.19.8,<0.20")

Engine = Any


@dataclass(frozen=True)
class Patch:
    """One change to DeepSpeed: what it does, and the DeepSpeed names it reaches (dotted path -> the signature of
    that function as tested, or for a value its type's name)."""

    name: str
    what: str
    reaches: dict[str, str]


_ZERO12 = "deepspeed.runtime.zero.stage_1_and_2"
_ZERO3 = "deepspeed.runtime.zero.stage3"
_STAGE3 = f"{_ZERO3}.DeepSpeedZeroOptimizer_Stage3"

NORM_MASK = Patch(
    "norm-mask",
    "the gradient norm's inf/nan mask without a host-to-device copy that waited for the backward pass",
    {f"{_ZERO12}.mask_nan_or_inf_with_val_inplace": "(input, device=None, val=-1.0)"},
)
DEVICE_SKIP = Patch(
    "device-skip",
    "a step with an inf/nan gradient skipped on the device (fused AdamW's found_inf), not after a host wait",
    {
        f"{_ZERO12}.is_invalid_grad_norm": "(norm)",
        f"{_ZERO3}.is_invalid_grad_norm": "(norm)",
        f"{_ZERO3}.combine_grad_norm_groups": "(norm_groups, norm_type=2)",
        f"{_ZERO12}.DeepSpeedZeroOptimizer.scaled_global_norm": "(self, norm_type=2)",
        f"{_STAGE3}.get_grad_norm_direct": "(self, gradients, params, norm_type=2)",
        f"{_STAGE3}._assert_same_partition_group": "(self, params)",
        f"{_STAGE3}._get_param_partition_group": "(self, param)",
        f"{_STAGE3}._autoep_expert_parallel_group": "(self, params)",
        f"{_ZERO3}.get_norm_dtype": "()",
    },
)
PERSISTENT_REDUCTIONS = Patch(
    "persistent-reductions",
    "Inductor's persistent reductions kept in DeepCompile's graphs (mix-order reductions stay off)",
    {
        # a settings dict (its keys: tests/test_engine.py)
        "deepspeed.compile.inductor._DEEP_COMPILE_Z3_INDUCTOR_REDUCTION_CONFIG": "dict"
    },
)
ARCH_LIST = Patch(
    "arch-list",
    "TORCH_CUDA_ARCH_LIST entries such as '9.0a' made plain for DeepCompile's op build",
    {"deepspeed.ops.op_builder.builder.CUDAOpBuilder.compute_capability_args": "(self, cross_compile_archs=None)"},
)
NO_PERSISTENT_GATHER = Patch(
    "no-persistent-gather",
    "ZeRO-3's post-step gather of 'persistent' parameters dropped once DeepCompile has made none persistent",
    {f"{_STAGE3}._post_step": "(self, timer_names)"},
)
PATCHES = (NORM_MASK, DEVICE_SKIP, PERSISTENT_REDUCTIONS, ARCH_LIST, NO_PERSISTENT_GATHER)


def resolve(dotted: str) -> Any:
    """The object a dotted path names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def signature_of(obj: Any) -> str:
    """A function's signature as text (through DeepSpeed's nvtx wrapper, which keeps none), or a value's type."""
    if not callable(obj):
        return type(obj).__name__
    while True:
        sig = inspect.signature(obj)
        cells = getattr(obj, "__closure__", None) or ()
        inner = [c.cell_contents for c in cells if inspect.isfunction(c.cell_contents)]
        if str(sig) != "(*args, **kwargs)" or len(inner) != 1:
            return str(sig)
        obj = inner[0]


def deepspeed_version() -> str:
    return deepspeed.__version__


def why_not(patch: Patch) -> str | None:
    """Why `patch` stands down on the installed DeepSpeed (None where it applies)."""
    version = deepspeed_version()
    if Version(version) not in TESTED_DEEPSPEED:
        return f"DeepSpeed {version} is outside the tested releases ({TESTED_DEEPSPEED})"
    for dotted, tested in patch.reaches.items():
        try:
            found = signature_of(resolve(dotted))
        except (ImportError, AttributeError):
            return f"DeepSpeed {version} has no {dotted}"
        if found != tested:
            return f"DeepSpeed {version}'s {dotted} is {found}, tested as {tested}"
    return None


_NOTICED: set[str] = set()


def _applies(patch: Patch) -> bool:
    reason = why_not(patch)
    if reason is not None and patch.name not in _NOTICED:
        _NOTICED.add(patch.name)
        log.warning("DeepSpeed runs stock here, without %s (%s): %s", patch.name, patch.what, reason)
    return reason is None


def before_deepcompile() -> list[str]:
    """Under DeepCompile, before `engine.compile()`: its Inductor settings and op build. The names applied."""
    applied = []
    if _applies(PERSISTENT_REDUCTIONS):
        keep_persistent_reductions()
        applied.append(PERSISTENT_REDUCTIONS.name)
    if _applies(ARCH_LIST):
        plain_arch_list()
        applied.append(ARCH_LIST.name)
    return applied


def apply(engine: Engine) -> list[str]:
    """The patches for a built engine (after DeepCompile's `engine.compile()`, where it compiles); the names of
    those that took effect."""
    applied = []
    if _applies(NORM_MASK):
        _install_norm_mask()
        applied.append(NORM_MASK.name)
    if _applies(DEVICE_SKIP):
        _install_device_skip()
        if skip_steps_on_device(engine):
            applied.append(DEVICE_SKIP.name)
    if _applies(NO_PERSISTENT_GATHER) and drop_persistent_gather(engine):
        applied.append(NO_PERSISTENT_GATHER.name)
    return applied


def _install_norm_mask() -> None:
    from deepspeed.runtime.zero import stage_1_and_2

    stage_1_and_2.mask_nan_or_inf_with_val_inplace = _mask_non_finite


def _install_device_skip() -> None:
    """DeepSpeed's module-level functions that ZeRO's step calls by name, replaced once per process; each falls
    back to DeepSpeed's own wherever `skip_steps_on_device` has not marked the norm (other engines, other stages)."""
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    if not _STOCK:
        _STOCK.update(invalid=stage_1_and_2.is_invalid_grad_norm, combine=stage3.combine_grad_norm_groups)
        stage_1_and_2.is_invalid_grad_norm = stage3.is_invalid_grad_norm = _invalid_unless_skipped_on_device
        stage3.combine_grad_norm_groups = _combine_and_hand_over


_STOCK: dict[str, Any] = {}  # DeepSpeed's own functions that DEVICE_SKIP's replacements fall back to


def _mask_non_finite(norm: torch.Tensor, device: Any = None, val: float = -1.0) -> None:
    """DeepSpeed's `mask_nan_or_inf_with_val_inplace`, without building its fill value as a tensor on the device: that
    host-to-device copy waited for the whole backward pass before the host could queue the optimiser step."""
    norm.masked_fill_(~torch.isfinite(norm), val)


def _invalid_unless_skipped_on_device(norm: Any) -> bool:
    """DeepSpeed's `is_invalid_grad_norm` (a host wait on the norm), except for norms `skip_steps_on_device`
    has already handed to the optimiser."""
    return False if getattr(norm, "_skipped_on_device", False) else _STOCK["invalid"](norm)


def _combine_and_hand_over(norm_groups: list, norm_type: int = 2) -> torch.Tensor:
    """ZeRO-3's `combine_grad_norm_groups`, then `skip_steps_on_device`'s hand-over where it applies."""
    norm = _STOCK["combine"](norm_groups, norm_type)
    hand_over = next((n._hand_over for n in norm_groups if hasattr(n, "_hand_over")), None)
    return norm if hand_over is None else hand_over(norm)


def skip_steps_on_device(engine: Engine) -> bool:
    """Let ZeRO skip a step whose gradient norm is inf or nan without the host waiting for the norm.

    DeepSpeed reads the norm back as a Python bool before every optimiser step (to skip the step, and ZeRO-1/2
    again to clip), so the host cannot queue the step and the next forward pass while the GPU is still in the
    backward pass. Here the verdict stays on the device instead: torch's fused AdamW takes it as `found_inf` and
    leaves the weights, its moments and its step count unchanged, as DeepSpeed's skip does, and the clip uses the
    infinite norm DeepSpeed would have. Unlike DeepSpeed's skip, the learning-rate schedule still advances. Skipped
    steps are counted on the device (`skipped_steps`); a save adds them to DeepSpeed's count, which checkpoints
    keep. Returns whether it applies: ZeRO-1/2 or ZeRO-3 with torch's fused AdamW, no CPU offload, no fp16 loss
    scaler (and for ZeRO-1/2 the gradient norm computed; for ZeRO-3 no Muon and no model parallelism); otherwise
    DeepSpeed's own logic runs. Needs DEVICE_SKIP's module-level replacements installed."""
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    zero = engine.optimizer
    inner = getattr(zero, "optimizer", None)
    is_stage3 = isinstance(zero, stage3.DeepSpeedZeroOptimizer_Stage3)
    if isinstance(zero, stage_1_and_2.DeepSpeedZeroOptimizer):
        applies = zero.compute_grad_norm and not zero.cpu_offload
    elif is_stage3:
        applies = not (zero.offload_optimizer or zero.use_muon) and zero.model_parallel_group is None
    else:
        return False
    if not (
        applies
        and getattr(inner, "_step_supports_amp_scaling", False)  # fused: takes found_inf
        and zero.torch_autocast_gradscaler is None
        and not zero.custom_loss_scaler
        and zero.loss_scale == 1.0
    ):
        return False
    counted = torch.zeros((), device=engine.device)

    def hand_over(norm: torch.Tensor) -> torch.Tensor:
        invalid = ~torch.isfinite(norm) | (norm < 0)
        inner.found_inf = invalid.float()
        counted.add_(inner.found_inf)
        norm = norm.masked_fill(invalid, float("inf"))  # DeepSpeed's clip for an invalid norm
        norm._skipped_on_device = True
        return norm

    if is_stage3:
        zero.get_grad_norm_direct = _stage3_group_norm(zero, hand_over)
    else:
        global_norm = zero.scaled_global_norm
        zero.scaled_global_norm = lambda norm_type=2: hand_over(global_norm(norm_type))
    engine.skipped_on_device = counted
    return True


def _stage3_group_norm(zero: Any, hand_over: Any) -> Any:
    """ZeRO-3's `get_grad_norm_direct` for one parameter group, without its host wait: DeepSpeed builds the -1 it
    writes over an invalid norm as a tensor on the device, a blocking host-to-device copy per group. The same sums
    in the same order, then a fill with a plain number. Only the 2-norm without model or expert parallelism (what
    `skip_steps_on_device` admits); anything else goes to DeepSpeed's own. The norm carries `hand_over`, which
    `_combine_and_hand_over` applies to the groups' combined norm."""
    from deepspeed.runtime.zero import stage3

    direct = zero.get_grad_norm_direct

    def group_norm(gradients: list, params: list, norm_type: float = 2) -> torch.Tensor:
        if float(norm_type) != 2.0 or not gradients or zero._autoep_expert_parallel_group(params) is not None:
            return direct(gradients, params, norm_type)
        zero._assert_same_partition_group(params)
        device, dtype = stage3.get_accelerator().device_name(), stage3.get_norm_dtype()
        norms = [g.to(device, non_blocking=True).to(dtype).norm(2.0) for g in gradients]
        total = torch.sum(torch.pow(torch.stack(norms), 2.0))
        stage3.dist.all_reduce(total, op=stage3.dist.ReduceOp.SUM, group=zero._get_param_partition_group(params[0]))
        total = total ** (1.0 / 2.0)
        norm = total.masked_fill(~torch.isfinite(total), -1.0)
        norm._hand_over = hand_over
        return norm

    return group_norm


def keep_persistent_reductions() -> dict:
    """Let Inductor keep its persistent reductions (one block per LayerNorm row) in DeepCompile's graphs; returns
    the Inductor settings DeepCompile will still change. DeepCompile turns off both mix-order reductions and
    persistent reductions, against an oversized mix-order kernel that Triton rejected in one ZeRO-3 backward graph.
    Turning mix-order reductions off is what avoids that kernel (it forces persistence itself); persistence off as
    well cost Mixer-B/16 a further 1.6-3.4% on one H100 (docs/BENCHMARKS.md)."""
    from deepspeed.compile import inductor

    patch = inductor._DEEP_COMPILE_Z3_INDUCTOR_REDUCTION_CONFIG
    patch.pop("triton.persistent_reductions", None)
    return patch


def plain_arch_list() -> str | None:
    """DeepCompile builds DeepSpeed's `dc` op on first use, and DeepSpeed 0.19.8's op builder reads each
    TORCH_CUDA_ARCH_LIST entry as numbers: an architecture-specific one that PyTorch itself accepts, such as
    Hopper's "9.0a" (CUDA images for H100s set it), stops it with "invalid literal for int() with base 10: '0a'"
    before anything is compiled. The op uses no architecture-specific instruction, so the plain architecture serves:
    "9.0a" -> "9.0" for this process. Returns the value now in effect."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if value:
        plain = re.sub(r"(\d+\.\d+)[af]\b", r"\1", value)
        if plain != value:
            log.info("TORCH_CUDA_ARCH_LIST %r -> %r for DeepSpeed's op builder", value, plain)
            os.environ["TORCH_CUDA_ARCH_LIST"] = value = plain
    return value


def drop_persistent_gather(engine: Engine) -> bool:
    """Stop ZeRO-3's optimiser from gathering its "persistent" parameters after every step once none of them is
    persistent any more; returns whether it stopped. ZeRO-3 keeps parameters under
    `stage3_param_persistence_threshold` elements whole on every rank, and gathers them again after each step
    (`_post_step`). DeepCompile turns that persistence off and gathers every parameter inside its graph, but the
    optimiser's post-step gather stays: a collective whose result is never read, and a point where the host waits.
    Without it, Mixer-B/16 under ZeRO-3 + DeepCompile ran 2.3% faster on one H100, to the same loss
    (docs/BENCHMARKS.md). ZeRO-3's step partitions every parameter first, so these then stay partitioned like the
    rest, and whatever gathers them later (`GatheredParameters`, a checkpoint) reads the updated values."""
    persistent = getattr(engine.optimizer, "persistent_parameters", None)  # ZeRO-3's optimiser only
    if not persistent or any(p.ds_persist for p in persistent):
        return False
    persistent.clear()  # in place: ZeRO-3's parameter offload holds the same list
    return True
