"""Builds the DeepSpeed config from the typed config and owns the engine: build, save, load (DeepSpeed is imported
here and in `engine_patches`, which this module applies explicitly; importing either patches nothing)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import pickle
import re
import subprocess
import sys
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import DeepSpeedConfig, OptimConfig, StageConfig
from pipeline.models.mixer import MixerBlock, StackedBlocks, unstack_state

# DeepSpeed logs every setting at INFO on every rank, and warns when it falls back to the CPU; say it outright.
logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402  (after the logger is quietened: it logs on import)
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine  # noqa: E402
from deepspeed.runtime.fp16.loss_scaler import LossScaler  # noqa: E402
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402
from deepspeed.utils import logging as ds_logging  # noqa: E402
from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: E402

from pipeline import engine_patches  # noqa: E402

ds_logging.set_log_level_from_string("error")

Engine = Any  # deepspeed.DeepSpeedEngine; kept opaque outside this module


@contextlib.contextmanager
def _quiet():
    """DeepSpeed prints progress chatter (op builds, checkpoint parsing) with print(); keep it off the console."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def zero_stage_of(stage: StageConfig, ds: DeepSpeedConfig) -> int:
    return ds.zero_stage if stage.zero_stage is None else stage.zero_stage


def uses_bf16(ds: DeepSpeedConfig, device: torch.device) -> bool:
    return ds.precision == "bf16" or (ds.precision == "auto" and device.type == "cuda")


def matmul_dtype(ds: DeepSpeedConfig, device: torch.device) -> torch.dtype:
    """The dtype the matrix products run in (what MFU's peak rate is for); under autocast, not the weights'."""
    return torch.bfloat16 if uses_bf16(ds, device) or ds.precision == "autocast" else torch.float32


def build_config(
    stage: StageConfig, ds: DeepSpeedConfig, world_size: int, device: torch.device, load_universal: bool = False
) -> dict:
    """The DeepSpeed JSON for one stage; written next to the stage's checkpoints and logged to MLflow.
    `load_universal`: the engine will resume from a universal checkpoint (`to_universal`), written by another
    number of ranks."""
    zero = zero_stage_of(stage, ds)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": stage.micro_batch,
        "gradient_accumulation_steps": stage.accumulation(world_size),
        "train_batch_size": stage.micro_batch * stage.accumulation(world_size) * world_size,
        # bf16 has fp32's exponent range: no loss scaling, so no per-parameter overflow scan and host sync before
        # every step (on one H100 this took DeepSpeed's step from 0.67x to 0.80x of the same step without DeepSpeed,
        # docs/BENCHMARKS.md). A non-finite loss still stops the run.
        "bf16": {"enabled": uses_bf16(ds, device), "check_grad_overflow": False},
        "zero_optimization": {
            "stage": zero,
            # One rank has nothing to overlap, and DeepSpeed's overlap synchronises the device at every bucket
            "overlap_comm": ds.overlap_comm and world_size > 1,
            "contiguous_gradients": True,
            "reduce_bucket_size": ds.reduce_bucket_size,
            "allgather_bucket_size": ds.reduce_bucket_size,
        },
        "steps_per_print": 2**62,  # the loop reports progress itself
        # DeepSpeed's throughput timer synchronises the device at every forward pass and step by default; the loop
        # times itself, and those two waits per step left the GPU idle while the host caught up.
        "timers": {"throughput": {"enabled": False}},
    }
    if ds.precision == "autocast":
        # fp32 weights and optimiser, bf16 matrix products: DeepSpeed enters torch.autocast around the forward pass
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    if not stage.kind.trains:
        # No optimiser: only ZeRO-3's parameter partitioning means anything for a forward pass.
        config["zero_optimization"] = {"stage": 3 if zero == 3 else 0}
        return config
    if ds.compile and zero == 3 and device.type == "cuda":
        # DeepSpeed's DeepCompile (it has no CPU build): `build_engine` compiles through the engine, not the model
        config["compile"] = {"deepcompile": True}
    optim = stage.optim
    if optim.grad_clip > 0:
        config["gradient_clipping"] = optim.grad_clip
    if optim.name == "adamw":
        config["optimizer"] = _adamw_config(optim)
    else:
        # DeepSpeed has no plain momentum-SGD type: `build_engine` passes torch.optim.SGD as a client optimiser.
        config["zero_allow_untested_optimizer"] = True
    config["scheduler"] = _scheduler_config(optim, stage.steps)
    return config


def _adamw_config(optim: OptimConfig) -> dict:
    params: dict[str, Any] = {
        "lr": optim.lr,
        "betas": list(optim.betas),
        "eps": 1e-8,
        "weight_decay": optim.weight_decay,
        "torch_adam": True,
    }
    # torch's fused AdamW kernel (CUDA and CPU): no JIT-built DeepSpeed op, and it can skip a step on the device
    # (`engine_patches.skip_steps_on_device`)
    params["fused"] = True
    return {"type": "AdamW", "params": params}


def _scheduler_config(optim: OptimConfig, steps: int) -> dict:
    """Linear warm-up from 0, then linear or cosine decay to 0 at the stage's last step."""
    warmup = max(1, optim.warmup_steps)  # DeepSpeed's schedulers need at least one warm-up step
    if optim.schedule == "linear":
        params = {"warmup_min_lr": 0.0, "warmup_max_lr": optim.lr}
        kind = "WarmupDecayLR"
    else:
        params = {"warmup_min_ratio": 0.0, "cos_min_ratio": 0.0}
        kind = "WarmupCosineLR"
    params |= {"warmup_num_steps": warmup, "total_num_steps": steps, "warmup_type": "linear"}
    return {"type": kind, "params": params}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and the stem kernel only, not on biases and LayerNorm parameters (by name: a
    stacked model's biases have a block axis too)."""
    groups: dict[bool, list[nn.Parameter]] = {True: [], False: []}
    for name, p in model.named_parameters():
        groups[name.endswith(".weight") and "norm" not in name].append(p)
    decay, no_decay = groups[True], groups[False]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def to_float8(model: nn.Module, recipe: str) -> list[str]:
    """Float8 matrix products (torchao's `Float8Linear`, dynamic scaling per `recipe`) in every channel-mixing
    MLP: ~89% of a Mixer's matmul FLOPs, with dimensions that float8 GEMMs take (multiples of 16). Token mixing
    (S = 196 tokens at 224/16), the stem and the head stay in bf16. Parameter names do not change, so checkpoints
    load either way. Returns the converted modules' names.

    On CUDA it needs compute capability 8.9 or more; on the CPU the float8 products are emulated (for tests)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    config = Float8LinearConfig.from_recipe_name(recipe)
    if deepspeed.get_accelerator().device_name() != "cuda":
        config = dataclasses.replace(config, emulate=True)
    elif torch.cuda.get_device_capability() < (8, 9):
        name = torch.cuda.get_device_name()
        raise ValueError(f"deepspeed.fp8={recipe} needs float8 matrix products (compute capability 8.9+): {name}")

    def channel_mixing(module: nn.Module, name: str) -> bool:
        return ".channel_mixing." in f".{name}" and module.in_features % 16 == 0 and module.out_features % 16 == 0

    convert_to_float8_training(model, module_filter_fn=channel_mixing, config=config)
    return [name for name, module in model.named_modules() if isinstance(module, Float8Linear)]


def build_engine(
    model: nn.Module, stage: StageConfig, config: dict, compile_mode: str | None = None, fp8: str = "none"
) -> Engine:
    """deepspeed.initialize with our optimiser choice; the process group must already exist. `compile_mode`:
    torch.compile's mode for the model, None for eager; `fp8`: see `to_float8`. With DeepCompile in `config`
    (compiled ZeRO-3 on GPUs) the engine compiles the model after ZeRO has partitioned it, in the default mode."""
    if fp8 != "none":
        to_float8(model, fp8)
    deepcompile = compile_mode is not None and uses_deepcompile(config)
    if deepcompile and (compile_mode != "default" or fp8 != "none"):
        raise ValueError(f"DeepCompile runs torch.compile's default mode without fp8, not {compile_mode!r}, {fp8!r}")
    if config["zero_optimization"]["stage"] == 3:
        gather_with_their_block(model)
    stacked = [m for m in model.modules() if isinstance(m, StackedBlocks)]
    if deepcompile:
        for blocks in stacked:
            blocks.slicing = "select"  # DeepCompile frees gathered weights by their last use; see StackedBlocks
    mode = model_compile_mode(config, compile_mode, deepspeed.get_accelerator().device_name(), bool(stacked))
    if mode is not None:
        model.compile(mode=mode)  # nn.Module.compile keeps parameter names: checkpoints stay interchangeable
    if not stage.kind.trains:
        with _quiet():
            engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
        return engine
    groups = param_groups(model, stage.optim.weight_decay)
    client_optimizer = None
    if stage.optim.name == "sgd":
        client_optimizer = torch.optim.SGD(groups, lr=stage.optim.lr, momentum=stage.optim.momentum)
    with _quiet():
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=groups, optimizer=client_optimizer, config=config
        )
    if deepcompile:
        engine_patches.before_deepcompile()
        engine.compile()  # DeepCompile's backend: Inductor, with ZeRO's gathers, releases and reductions in the graph
    engine_patches.apply(engine)
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    return engine


def uses_deepcompile(config: dict) -> bool:
    """Whether the DeepSpeed config `build_config` wrote compiles through DeepCompile (compiled ZeRO-3 on GPUs)."""
    return config.get("compile", {}).get("deepcompile", False)


def model_compile_mode(config: dict, compile_mode: str | None, device: str, stacked: bool = False) -> str | None:
    """torch.compile's mode for compiling the model itself, before `deepspeed.initialize`; None where it is not:
    eager, or compiled by DeepCompile (`config`). Under ZeRO-3 without DeepCompile the model runs eager on GPUs
    (evaluation stages: no optimiser), and with `stacked` blocks everywhere: compiled around ZeRO-3's per-module
    hooks, B/16 failed in Inductor with a misaligned address on an H100 (docs/BENCHMARKS.md), and dynamo refuses
    the stacked parameters' empty stand-ins."""
    if uses_deepcompile(config):
        return None
    if config["zero_optimization"]["stage"] == 3 and (device == "cuda" or stacked):
        return None
    return compile_mode


def gather_with_their_block(model: nn.Module) -> None:
    """ZeRO-3 gathers a module's partitioned parameters when that module's forward runs. A padded token-mixing MLP
    (`MixerBlock._mix_tokens`) is computed from its block's forward with its `Linear` weights as plain tensors, so
    those must be gathered with the block instead (DeepSpeed's external parameters)."""
    for block in model.modules():
        if isinstance(block, MixerBlock) and block.token_pad:
            for param in block.token_mixing.parameters():
                deepspeed.zero.register_external_parameter(block, param)


def skipped_steps(engine: Engine) -> int:
    """Optimiser steps skipped so far for an inf or nan gradient, by DeepSpeed or on the device; reads the device."""
    counted = getattr(engine, "skipped_on_device", None)
    return int(engine.skipped_steps) + (0 if counted is None else int(counted.item()))


# What DeepSpeed's checkpoint files hold besides tensors, numbers, strings and containers (which torch's
# weights_only unpickler allows by default): read off every file its ZeRO-0..3 saves (bf16 and fp32) and its
# universal conversion write, with torch.serialization.get_unsafe_globals_in_checkpoint. Nothing else may be
# unpickled: a checkpoint folder from elsewhere is data, and a pickle naming any other global is refused unread.
CHECKPOINT_TYPES = (LossScaler, ZeroStageEnum, fragment_address)


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint file whose pickle names a function or class that no DeepSpeed checkpoint holds."""


def safe_load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """torch.load with weights_only=True and `CHECKPOINT_TYPES` allowed; `UnsafeCheckpoint` naming the file and
    the global otherwise. With `mmap`, tensors stay on disk (a cheap full check of a large file's pickle)."""
    mmap = mmap and zipfile.is_zipfile(path)  # torch can map only its zip format, not the legacy one
    try:
        with torch.serialization.safe_globals(list(CHECKPOINT_TYPES)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # torch's message: a paragraph of advice, then what it refused ("... GLOBAL posix.system whose ...").
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        lines = [line for line in str(err).splitlines() if line.strip()]
        what = found.group(1) if found else lines[min(1, len(lines) - 1)]
        raise UnsafeCheckpoint(
            f"{path} is not a checkpoint file this pipeline wrote: its pickle asks for {what}, which no DeepSpeed "
            "checkpoint holds; refusing to unpickle it (loading it could run code of the file's author's choosing)"
        ) from None


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's file reader and writer, reading with `safe_load` (DeepSpeed's own unpickles anything)."""

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location)


class BackgroundCheckpointEngine(SafeCheckpointEngine):
    """DeepSpeed's file writer, made non-blocking: `save` copies the state into host buffers (the only part the
    training loop waits for) and a background thread serialises and writes it. `wait` blocks until every file
    handed over so far is on disk and returns their paths.

    The host buffers are pinned (on GPUs) and kept from one save to the next, keyed by file name and place in the
    state: allocating and pinning gigabytes on every save would cost more than the copy. The caller must `wait`
    before the next save, which refills them. DeepSpeed's own asynchronous writers (`checkpoint.writer`) need its
    `aio` op compiled against libaio; this needs nothing beyond torch."""

    def __init__(self, config_params: Any = None) -> None:
        super().__init__(config_params)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: list[tuple[str, Future]] = []
        self._buffers: dict[tuple, torch.Tensor] = {}

    def save(self, state_dict: Any, path: str) -> None:
        snapshot = self._host_copy(state_dict, (Path(path).name,))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies into pinned buffers are asynchronous
        self._pending.append((path, self._writer.submit(SafeCheckpointEngine.save, self, snapshot, path)))

    def wait(self) -> list[Path]:
        pending, self._pending = self._pending, []
        for _, future in pending:
            future.result()  # re-raises a failed write here
        return [Path(path) for path, _ in pending]

    def _host_copy(self, obj: Any, key: tuple) -> Any:
        """`obj` with every tensor copied into its host buffer (containers rebuilt, other leaves shared)."""
        if torch.is_tensor(obj):
            buffer = self._buffers.get(key)
            if buffer is None or buffer.shape != obj.shape or buffer.dtype != obj.dtype:
                buffer = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
                self._buffers[key] = buffer
            return buffer.copy_(obj.detach(), non_blocking=True)
        if isinstance(obj, dict):
            return type(obj)((k, self._host_copy(v, (*key, k))) for k, v in obj.items())
        if isinstance(obj, list | tuple) and not hasattr(obj, "_fields"):
            return type(obj)(self._host_copy(v, (*key, i)) for i, v in enumerate(obj))
        return obj


def write_in_background(engine: Engine) -> None:
    """From now on the engine's checkpoint files are written by a background thread (`saved_files` waits)."""
    engine.checkpoint_engine = BackgroundCheckpointEngine(engine._config)


def saved_files(engine: Engine) -> list[Path]:
    """With background writing: wait until the files of the saves so far are written; their paths."""
    writer = engine.checkpoint_engine
    return writer.wait() if isinstance(writer, BackgroundCheckpointEngine) else []


def save_checkpoint(engine: Engine, directory: Path, tag: str, client_state: dict) -> None:
    """Collective: every rank writes its shard (`zero_pp_rank_<r>_*`). `latest` is left to `pipeline.checkpoint`,
    which moves it only once the checkpoint is complete."""
    counted = getattr(engine, "skipped_on_device", None)
    if counted is not None:  # into DeepSpeed's own count, which its checkpoints keep
        engine.skipped_steps += int(counted.item())
        counted.zero_()
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)


def load_checkpoint(engine: Engine, directory: Path, tag: str) -> dict | None:
    """Collective: restore model, optimiser and schedule from `directory/tag`; returns the client state."""
    path, client_state = engine.load_checkpoint(str(directory), tag=tag)
    if engine.load_universal_checkpoint():
        _steps_beside_params(engine.optimizer)
    return client_state if path is not None else None


def _steps_beside_params(optimizer: Any) -> None:
    """DeepSpeed's universal loader restores Adam's `step` as a CPU tensor, while torch's fused AdamW wants it on
    its parameter's device (torch's own load_state_dict moves it there); do what that would have done."""
    inner = getattr(optimizer, "optimizer", optimizer)  # the torch optimiser inside DeepSpeed's ZeRO wrapper
    for group in inner.param_groups:
        for param in group["params"]:
            step = inner.state.get(param, {}).get("step")
            if torch.is_tensor(step) and step.device != param.device and group.get("fused"):
                inner.state[param]["step"] = step.to(param.device, torch.float32)


def to_universal(checkpoint_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's universal checkpoint of one sharded checkpoint: every parameter and its optimiser state whole,
    so that any number of ranks can load it (`build_config(load_universal=True)`). Call on one process only.

    The converter runs in a fresh process: it forks worker pools, which must not inherit a rank's CUDA context
    and NCCL threads. DeepSpeed 0.19.8's converter knows Adam's state only (`exp_avg`, `exp_avg_sq`): a
    momentum-SGD checkpoint cannot be converted, and a ZeRO-3 one comes back with its Adam moments changed;
    `pipeline.checkpoint` refuses both before calling this."""
    workers = max(1, min(8, (os.cpu_count() or 1) // 2))
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(checkpoint_dir),
        "--output_folder",
        str(out_dir),
        "--num_extract_workers",
        str(workers),
        "--num_merge_workers",
        str(max(1, workers // 2)),
        "--inject_missing_state",  # our checkpoints carry no Megatron-style universal info; none is needed
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"DeepSpeed's universal conversion of {checkpoint_dir} failed:\n{proc.stderr[-3000:]}")


def consolidated_state_dict(directory: Path, tag: str, zero_stage: int = 1) -> dict[str, torch.Tensor]:
    """fp32 weights of one checkpoint: gathered from the per-rank shards (ZeRO >= 1), or the one model file that
    plain data parallelism writes (ZeRO-0). Only for checkpoints that `pipeline.checkpoint.verify` passed:
    DeepSpeed's consolidation unpickles its files unchecked."""
    if zero_stage == 0:
        state = safe_load(directory / tag / "mp_rank_00_model_states.pt")
        return {k: v.float() for k, v in state["module"].items()}
    with _quiet():
        state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    return unstack_state(state)  # ZeRO names a stacked model's parameters as they are in training
