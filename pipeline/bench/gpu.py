"""What the one-GPU benchmarks share: a fixed synthetic batch, the step timer and its profile by kernel kind, and
DeepSpeed's engine and step as `mixer run` builds them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline import dist
from pipeline.config import DeepSpeedConfig, OptimConfig, StageConfig
from pipeline.models.mixer import VARIANTS, MixerSpec, MlpMixer

NUM_CLASSES = 1000
Step = Callable[[torch.Tensor, torch.Tensor], None]
Batches = Callable[[], tuple[torch.Tensor, torch.Tensor]]  # the next (images, labels) on the device


@dataclass
class Result:
    name: str
    images_per_s: float
    step_ms: float
    peak_memory_gib: float
    profile: dict[str, float] | None = None  # `profile_step`'s milliseconds per step by kernel category


def one_gpu(bench: str, model: str, batch: int) -> tuple[dist.DistEnv, MixerSpec, torch.Tensor, torch.Tensor]:
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


def fixed(images: torch.Tensor, labels: torch.Tensor) -> Batches:
    return lambda: (images, labels)


def time_steps(step: Step, batches: Batches, warmup: int, steps: int) -> tuple[float, float]:
    """Images/s and ms per step over `steps` steps after `warmup` untimed ones, the device synchronised at both
    ends."""
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


def measure(name: str, step: Step, batches: Batches, warmup: int, steps: int, profile: bool) -> Result:
    """`time_steps`, the peak memory, and (`profile`) the time by kernel kind."""
    torch.cuda.reset_peak_memory_stats()
    ips, ms = time_steps(step, batches, warmup, steps)
    peak = torch.cuda.max_memory_allocated() / 2**30
    result = Result(name, ips, ms, peak, profile_step(name, step, batches) if profile else None)
    print(f"{name}: {ips:.0f} img/s, {ms:.1f} ms/step", flush=True)
    return result


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


def profile_step(name: str, step: Step, batches: Batches, steps: int = 3) -> dict[str, float]:
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


def deepspeed_engine(model: MlpMixer, batch: int, zero_stage: int, compile_mode: str | None, ds_options: dict):
    """`model` in DeepSpeed's engine as `mixer run` builds it for one GPU (fused AdamW, clipping, warm-up), micro
    batch `batch`; `ds_options` are `deepspeed:` config keys (precision, fp8, compile, buckets)."""
    from pipeline import engine as eng  # deepspeed is imported when a benchmark runs, not when `mixer` parses

    stage = StageConfig(
        name="bench", kind="pretrain", dataset="synthetic", steps=10**6, micro_batch=batch,
        optim=OptimConfig(warmup_steps=10),
    )  # fmt: skip
    ds = DeepSpeedConfig(**{"zero_stage": zero_stage, "precision": "bf16", **ds_options})
    config = eng.build_config(stage, ds, 1, torch.device("cuda"))
    return eng.build_engine(model, stage, config, compile_mode, ds.fp8)


def engine_step(engine, precision: str = "bf16") -> Step:
    """The step `mixer run` takes: forward, `engine.backward`, `engine.step`. Input in bf16 for bf16 weights, in
    fp32 for fp32 weights under autocast (`precision: autocast`)."""
    dtype = torch.float32 if precision == "autocast" else torch.bfloat16

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        loss = F.cross_entropy(engine(images.to(dtype)).float(), labels)
        engine.backward(loss)
        engine.step()

    return step
