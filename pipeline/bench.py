"""`mixer bench train`: the project's real training step against timm's MlpMixer + torch.compile, in one process,
and against the JAX/Flax Mixer the paper's authors train (`pipeline.bench_jax`, in a subprocess of its own).

Every variant trains the same Mixer shape on the same synthetic batch (random 224x224 input, random labels) in
bf16, with fused AdamW, for `warmup` untimed and `steps` timed optimiser steps. Throughput is images over the
wall time of the timed steps (the device synchronised at both ends); MFU divides the training FLOPs by the bf16
matmul rate measured in the same process (and the datasheet peak, for reference).

End to end (`--end-to-end`): the headline variant's step, already warm, is timed again on batches from JPEG shards
through the training loader's GPU path (loader workers read the shards, nvJPEG decodes and the crops are made on
the GPU, two batches ahead on a side stream), exactly as `mixer run` feeds it with `data.decode: gpu`.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import checkpoint, dist
from pipeline import engine as eng
from pipeline.config import AugmentConfig, DeepSpeedConfig, OptimConfig, StageConfig
from pipeline.data.bench import bench_plan, bench_source
from pipeline.data.gpu import Prefetched, gpu_stream
from pipeline.data.transforms import normalize
from pipeline.flops import measure_matmul_flops, peak_flops, train_flops_per_image
from pipeline.models.mixer import REMAT, VARIANTS, MixerSpec, MlpMixer, bytes_kept_for_backward

NUM_CLASSES = 1000
Step = Callable[[torch.Tensor, torch.Tensor], None]
Batches = Callable[[], tuple[torch.Tensor, torch.Tensor]]  # the next (images, labels) on the device


@dataclass
class Result:
    name: str
    images_per_s: float
    step_ms: float
    peak_memory_gib: float
    profile: dict[str, float] | None = None  # `_profile`'s milliseconds per step by kernel category (--profile)


def _time(step: Step, batches: Batches, warmup: int, steps: int) -> tuple[float, float]:
    for _ in range(warmup):
        step(*batches())
    torch.cuda.synchronize()
    start = time.perf_counter()
    images = 0
    for _ in range(steps):
        batch = batches()
        images += len(batch[1])
        step(*batch)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return images / seconds, seconds / steps * 1000


def _fixed(images: torch.Tensor, labels: torch.Tensor) -> Batches:
    return lambda: (images, labels)


# Where a kernel's time is counted in the profile table: the first category with a matching name part. Inductor
# names its fused Triton kernels after the ops they hold (triton_per_fused_native_layer_norm_..., ..._gelu_...).
KERNEL_CATEGORIES = (
    ("GEMMs", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "matmul", "triton_tem_", "_mm_")),
    ("norms", ("layer_norm", "layernorm")),
    ("activations", ("gelu",)),
    ("optimizer", ("adam", "multi_tensor", "foreach", "clip")),
    ("communication", ("nccl", "allreduce", "all_gather", "reduce_scatter")),
    ("copies", ("copy", "memcpy", "memset", "cat_", "clone", "transpose", "fill")),
)


def kernel_category(name: str) -> str:
    lowered = name.lower()
    return next((cat for cat, parts in KERNEL_CATEGORIES if any(p in lowered for p in parts)), "other kernels")


def _profile(name: str, step: Step, batches: Batches, steps: int = 3) -> dict[str, float]:
    """Where one step's time goes: GPU milliseconds per step by kernel category (KERNEL_CATEGORIES), and "idle",
    the part of the step's wall time in which no kernel ran. Prints that table and the top operators by device
    and by host time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step(*batches())
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1000 / steps
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by_category = dict.fromkeys([cat for cat, _ in KERNEL_CATEGORIES] + ["other kernels"], 0.0)
    intervals = []
    for kernel in kernels:
        by_category[kernel_category(kernel.name)] += kernel.time_range.elapsed_us() / 1000 / steps
        intervals.append((kernel.time_range.start, kernel.time_range.end))
    busy_us, reach = 0.0, float("-inf")
    for begin, end in sorted(intervals):  # the union of the kernels' intervals: streams may overlap
        if end > reach:
            busy_us += end - max(begin, reach)
            reach = end
    by_category["idle"] = max(wall_ms - busy_us / 1000 / steps, 0.0)
    averages = prof.key_averages()
    print(f"--- profile of {steps} steps: {name}: {wall_ms:.1f} ms per step", flush=True)
    for category, ms in by_category.items():
        print(f"  {category:>14}: {ms:7.2f} ms  {ms / wall_ms:6.1%}", flush=True)
    print(averages.table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60), flush=True)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60), flush=True)
    return {"step_ms": wall_ms, **by_category}


def _plain_step(model: torch.nn.Module) -> Step:
    """Autocast bf16 over fp32 weights, fused AdamW: how timm's train.py runs."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timm_model(spec: MixerSpec) -> torch.nn.Module:
    from timm.models.mlp_mixer import MlpMixer as TimmMixer

    ratios = (spec.tokens_mlp_dim / spec.hidden_dim, spec.channels_mlp_dim / spec.hidden_dim)
    return TimmMixer(
        num_classes=NUM_CLASSES,
        img_size=spec.image_size,
        patch_size=spec.patch_size,
        num_blocks=spec.num_blocks,
        embed_dim=spec.hidden_dim,
        mlp_ratio=ratios,
    )


def _deepspeed_step(engine: eng.Engine, ds_options: dict) -> Step:
    """The step `mixer run` takes: DeepSpeed engine, fused AdamW, clipping; bf16 weights with fp32 master copies,
    or (`precision: autocast` in `ds_options`) fp32 weights with bf16 matrix products under autocast."""
    return _engine_step(engine, torch.float32 if ds_options.get("precision") == "autocast" else torch.bfloat16)


def _deepspeed_engine(
    spec: MixerSpec,
    batch: int,
    zero_stage: int,
    compile_mode: str | None,
    ds_options: dict,
    gelu: str = "exact",
    stacked: bool = False,
    remat: str = "none",
    fused_gelu: bool = False,
) -> eng.Engine:
    stage = StageConfig(
        name="bench",
        kind="pretrain",
        dataset="synthetic",
        steps=10**6,
        micro_batch=batch,
        optim=OptimConfig(warmup_steps=10),
    )
    ds = DeepSpeedConfig(**{"zero_stage": zero_stage, "precision": "bf16", **ds_options})
    config = eng.build_config(stage, ds, 1, torch.device("cuda"))
    model = MlpMixer(spec, NUM_CLASSES, gelu=gelu, stacked=stacked, remat=remat, fused_gelu=fused_gelu)
    return eng.build_engine(model, stage, config, compile_mode, ds.fp8)


def _engine_step(engine: eng.Engine, dtype: torch.dtype = torch.bfloat16) -> Step:
    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        loss = F.cross_entropy(engine(images.to(dtype)).float(), labels)
        engine.backward(loss)
        engine.step()

    return step


def _one_gpu(bench: str, model: str, batch: int) -> tuple[dist.DistEnv, MixerSpec, torch.Tensor, torch.Tensor]:
    """A one-process job on the GPU, the variant's shape, and a fixed synthetic batch (random 224² images)."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"mixer bench {bench} needs a CUDA GPU")
    env = dist.read_env("cuda")
    dist.init_process_group(env)
    spec = VARIANTS[model]
    torch.manual_seed(0)
    images = torch.randn(batch, 3, spec.image_size, spec.image_size, device="cuda")
    labels = torch.randint(0, NUM_CLASSES, (batch,), device="cuda")
    return env, spec, images, labels


@dataclass
class EndToEnd:
    """Where `--end-to-end` reads its JPEGs: `shards` (a folder with index.json or a shard pattern), or `generate`
    generated 500x375 photos; `workers` loader worker processes."""

    workers: int = 8
    shards: str | None = None
    generate: int = 8000


def shard_batches(spec: MixerSpec, batch: int, end_to_end: EndToEnd, device: torch.device) -> Prefetched:
    """The training loader's GPU path (`data.decode: gpu`, default augmentation: inception crop and flip) over the
    benchmark's shards, batches of `batch`."""
    source = bench_source(end_to_end.shards, end_to_end.generate)
    return gpu_stream(bench_plan(source, end_to_end.workers, batch), AugmentConfig(), spec.image_size, device)


def standardised(stream: Prefetched) -> Batches:
    """The loader's uint8 batches as model input, as the training loop makes it."""

    def batches() -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = next(stream)
        return normalize(images), labels

    return batches


JAX = "jax/flax"  # the peer's variant name: pipeline.bench_jax in a subprocess


def jax_missing() -> str | None:
    """Why the JAX/Flax peer cannot run here (None if it can)."""
    missing = [name for name in ("jax", "flax", "optax") if importlib.util.find_spec(name) is None]
    return f"{', '.join(missing)} not installed (pip install '.[bench]')" if missing else None


def _measure_jax(model: str, batch: int, steps: int, warmup: int, gelu: str, rows: list[Result]) -> None:
    """The JAX/Flax step, timed as the others are, in its own process (its own GPU memory pool: ours is emptied
    first, and JAX allocates on demand)."""
    torch.cuda.empty_cache()
    cmd = [sys.executable, "-m", "pipeline.bench_jax", "--model", model, "--batch", str(batch), "--steps", str(steps),
           "--warmup", str(warmup), "--gelu", gelu]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"the JAX/Flax peer failed (exit {done.returncode}): {done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    rows.append(Result(JAX, out["images_per_s"], out["step_ms"], out["peak_memory_gib"]))
    print(f"{JAX} (jax {out['jax']}, flax {out['flax']}): {out['images_per_s']:.0f} img/s", flush=True)


def _measure(
    name: str, step: Step, batches: Batches, warmup: int, steps: int, profile: bool, rows: list[Result]
) -> None:
    torch.cuda.reset_peak_memory_stats()
    ips, ms = _time(step, batches, warmup, steps)
    peak = torch.cuda.max_memory_allocated() / 2**30
    rows.append(Result(name, ips, ms, peak, _profile(name, step, batches) if profile else None))
    print(f"{name}: {ips:.0f} img/s, {ms:.1f} ms/step", flush=True)


def run_train_bench(
    model: str,
    batch: int,
    steps: int,
    warmup: int,
    variants: list[str],
    ds_options: dict | None = None,
    profile: bool = False,
    gelu: str = "exact",
    end_to_end: EndToEnd | None = None,
) -> dict:
    """Measure each variant in turn on one GPU; returns rows plus the headline numbers. `gelu`: our model's GELU
    (timm's is always the exact one). `end_to_end`: the headline variant again, fed from JPEG shards."""
    env, spec, images, labels = _one_gpu("train", model, batch)
    builders = _builders(spec, batch, ds_options or {}, gelu)
    unknown = [name for name in variants if name not in builders and name != JAX]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {list(builders)}")
    headline = next((name for name in variants if name.startswith("ours DeepSpeed")), variants[-1])
    rows: list[Result] = []
    from_shards = None
    no_jax = jax_missing() if JAX in variants else None
    for name in variants:
        if name == JAX:
            if no_jax:
                print(f"{JAX}: left out, {no_jax}", flush=True)
            else:
                _measure_jax(model, batch, steps, warmup, gelu, rows)
            continue
        torch.cuda.empty_cache()
        step = builders[name]()
        _measure(name, step, _fixed(images, labels), warmup, steps, profile, rows)
        if end_to_end is not None and name == headline:
            stream = shard_batches(spec, batch, end_to_end, env.device)
            try:
                _measure(f"{name}, from JPEG shards", step, standardised(stream), warmup, steps, profile, rows)
                from_shards = rows[-1]
            finally:
                stream.close()
        del step
        gc.collect()
    measured = measure_matmul_flops(env.device, torch.bfloat16)
    datasheet, _ = peak_flops(env.device, torch.bfloat16)
    flops = train_flops_per_image(spec)
    by_name = {r.name: r for r in rows}
    ours = by_name[headline]
    baseline = by_name.get("timm + compile", rows[0])
    peer = by_name.get(JAX)
    shards = {}
    if from_shards is not None:
        shards = {
            "end_to_end_images_per_s": from_shards.images_per_s,
            "end_to_end_ratio": from_shards.images_per_s / ours.images_per_s,
            "end_to_end_workers": end_to_end.workers,
        }
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": model,
        "batch": batch,
        "gelu": gelu,
        "train_gflops_per_image": flops / 1e9,
        "measured_bf16_matmul_tflops": measured / 1e12,
        "datasheet_bf16_tflops": datasheet / 1e12,
        "rows": [
            {
                **r.__dict__,
                "mfu": r.images_per_s * flops / measured,
                "mfu_datasheet": r.images_per_s * flops / datasheet,
            }
            for r in rows
        ],
        "ours": ours.name,
        "images_per_s": ours.images_per_s,
        "baseline": baseline.name,
        "baseline_images_per_s": baseline.images_per_s,
        "mfu": ours.images_per_s * flops / measured,
        "speedup": ours.images_per_s / baseline.images_per_s,
        "jax_images_per_s": peer.images_per_s if peer else None,
        "speedup_vs_jax": ours.images_per_s / peer.images_per_s if peer else None,
        "jax_left_out": no_jax,
        **shards,
    }


AUTOTUNE = "max-autotune-no-cudagraphs"


def _builders(spec: MixerSpec, batch: int, ds_options: dict, gelu: str) -> dict[str, Callable[[], Step]]:
    """Every variant by name: timm's model, ours without DeepSpeed, and ours in DeepSpeed's engine per ZeRO stage,
    compile mode and precision."""

    def ours(stacked: bool = False, remat: str = "none") -> MlpMixer:
        return MlpMixer(spec, NUM_CLASSES, gelu=gelu, stacked=stacked, remat=remat)

    def fused() -> MlpMixer:  # model.fused_gelu, whose GELU is the tanh one whatever --gelu says
        return MlpMixer(spec, NUM_CLASSES, gelu="tanh", stacked=True, fused_gelu=True)

    builders: dict[str, Callable[[], Step]] = {
        "timm eager": lambda: _plain_step(timm_model(spec).cuda()),
        "timm + compile": lambda: _plain_step(torch.compile(timm_model(spec).cuda())),
        "ours + compile (no DeepSpeed)": lambda: _plain_step(torch.compile(ours().cuda())),
        "ours + max-autotune (no DeepSpeed)": lambda: _plain_step(torch.compile(ours().cuda(), mode=AUTOTUNE)),
        "ours + compile, stacked (no DeepSpeed)": lambda: _plain_step(torch.compile(ours(stacked=True).cuda())),
        "ours + compile, stacked, fused GELU (no DeepSpeed)": lambda: _plain_step(torch.compile(fused().cuda())),
    }
    for remat in REMAT[1:]:
        builders[f"ours + compile, stacked, remat {remat} (no DeepSpeed)"] = lambda r=remat: _plain_step(
            torch.compile(ours(stacked=True, remat=r).cuda())
        )
    for recipe in ("tensorwise", "rowwise"):
        builders[f"ours + compile, fp8 {recipe} (no DeepSpeed)"] = lambda r=recipe: _plain_step(
            torch.compile(_float8(ours(), r).cuda())
        )
    # (precision, fp8 recipe, stacked blocks, model.remat, name suffix)
    precisions = [("bf16", "none", False, "none", ""), ("autocast", "none", False, "none", " (autocast)")]
    precisions += [
        ("bf16", "none", True, "none", " (stacked)"),
        ("autocast", "none", True, "none", " (autocast, stacked)"),
    ]
    precisions += [("autocast", r, False, "none", f" (autocast, fp8 {r})") for r in ("tensorwise", "rowwise")]
    precisions += [("autocast", "none", True, m, f" (autocast, stacked, remat {m})") for m in REMAT[1:]]
    for zero in range(4):
        for compiled, mode in (("", None), (" + compile", "default"), (" + max-autotune", AUTOTUNE)):
            for precision, fp8, stacked, remat, suffix in precisions:
                name = f"ours DeepSpeed ZeRO-{zero}{compiled}{suffix}"
                # ZeRO-3 + compile is DeepSpeed's DeepCompile, as in `mixer run`
                options = {**ds_options, "precision": precision, "fp8": fp8, "compile": mode is not None}
                builders[name] = lambda z=zero, m=mode, o=options, s=stacked, r=remat: _deepspeed_step(
                    _deepspeed_engine(spec, batch, z, m, o, gelu, s, r), o
                )
    for zero in (1, 2):
        options = {**ds_options, "precision": "autocast", "compile": True}
        builders[f"ours DeepSpeed ZeRO-{zero} + compile (autocast, stacked, fused GELU)"] = lambda z=zero, o=options: (
            _deepspeed_step(_deepspeed_engine(spec, batch, z, "default", o, "tanh", True, fused_gelu=True), o)
        )
    return builders


def _float8(model: torch.nn.Module, recipe: str) -> torch.nn.Module:
    eng.to_float8(model, recipe)
    return model


# The headline ("ours") is the first DeepSpeed row: the step the paper configs run (docs/BENCHMARKS.md).
DEFAULT_VARIANTS = [
    "timm + compile",
    JAX,
    "ours DeepSpeed ZeRO-2 + compile (autocast, stacked)",
    "ours + compile, stacked (no DeepSpeed)",
]
ALL_VARIANTS = [
    "timm eager",
    "timm + compile",
    JAX,
    "ours + compile (no DeepSpeed)",
    "ours + compile, stacked (no DeepSpeed)",
    "ours + max-autotune (no DeepSpeed)",
    "ours DeepSpeed ZeRO-2 + compile (autocast, stacked)",
    "ours DeepSpeed ZeRO-1 + compile (autocast, stacked)",
    "ours DeepSpeed ZeRO-2 + max-autotune (autocast)",
    "ours DeepSpeed ZeRO-2 + compile (autocast)",
    "ours DeepSpeed ZeRO-2 + compile",
    "ours DeepSpeed ZeRO-1 + compile (autocast)",
    "ours DeepSpeed ZeRO-0 + compile (autocast)",
    "ours DeepSpeed ZeRO-2",
    "ours DeepSpeed ZeRO-3 (autocast)",
]


def run_remat_bench(model: str, device: str) -> dict:
    """Activation memory per `model.remat` setting: the bytes a training forward pass keeps for the backward pass
    under bf16 autocast, eager, per image (the difference between batches of 2 and 1) and independent of the batch
    (bf16 copies of the weights)."""
    spec = VARIANTS[model]
    target = torch.device(device)
    rows = []
    for remat in REMAT:
        torch.manual_seed(0)
        mixer = MlpMixer(spec, NUM_CLASSES, remat=remat).to(target)
        kept = []
        for batch in (1, 2):
            images = torch.randn(batch, 3, spec.image_size, spec.image_size, device=target)
            with torch.autocast(target.type, dtype=torch.bfloat16):
                kept.append(bytes_kept_for_backward(mixer, images))
        per_image, fixed = kept[1] - kept[0], 2 * kept[0] - kept[1]
        rows.append({"remat": remat, "mib_per_image": per_image / 2**20, "fixed_mib": fixed / 2**20})
    name = torch.cuda.get_device_name(target) if target.type == "cuda" else "cpu"
    return {"model": model, "device": name, "torch": torch.__version__, "rows": rows}


def run_checkpoint_bench(model: str, batch: int, saves: int, steps: int, workdir: Path) -> dict:
    """How long a checkpoint holds up training on one GPU: blocking saves, then background saves
    (`checkpoint_async`), of the same DeepSpeed ZeRO-2 engine. After each save `steps` training steps run (during
    the background write) before waiting for the checkpoint to be complete."""
    _, spec, images, labels = _one_gpu("checkpoint", model, batch)
    engine = _deepspeed_engine(spec, batch, 2, None, {})
    step = _engine_step(engine)
    _, step_ms = _time(step, _fixed(images, labels), warmup=3, steps=steps)
    rows = []
    for mode in ("blocking", "background"):  # background second: it replaces the engine's file writer for good
        saver = checkpoint.Saver(engine, workdir / mode, rank=0, world_size=1, keep=1, background=mode == "background")
        for i in range(saves):
            torch.cuda.synchronize()
            start = time.perf_counter()
            tag = saver.save(i + 1, {"bench": mode})
            blocked = time.perf_counter() - start
            _, during_ms = _time(step, _fixed(images, labels), warmup=0, steps=steps)
            saver.wait()
            complete = time.perf_counter() - start
            size = sum(p.stat().st_size for p in (workdir / mode / tag).rglob("*") if p.is_file())
            rows.append(
                {
                    "mode": mode,
                    "blocked_s": blocked,
                    "complete_s": complete,
                    "step_ms_after_save": during_ms,
                    "checkpoint_gb": size / 1e9,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    background = [r["blocked_s"] for r in rows if r["mode"] == "background"]
    return {
        "device": torch.cuda.get_device_name(),
        "model": model,
        "batch": batch,
        "step_ms": step_ms,
        "rows": rows,
        "background_blocked_s": sorted(background)[len(background) // 2],
    }
