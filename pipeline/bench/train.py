"""`mixer bench train`: the project's real training step against timm's MlpMixer + torch.compile, in one process,
and against the JAX/Flax Mixer the paper's authors train (`pipeline.bench.jax_peer`, in a subprocess of its own).

Every variant trains the same Mixer shape on the same synthetic batch (random 224x224 input, random labels) in
bf16, with fused AdamW, for `warmup` untimed and `steps` timed optimiser steps. Throughput is images over the
wall time of the timed steps (the device synchronised at both ends); MFU divides the training FLOPs by the bf16
matmul rate measured in the same process (and the datasheet peak, for reference).

The variants are values (`Timm`, `Ours`, `JaxPeer`) whose names are made from their fields; `REGISTRY` holds every
one the command accepts, `DEFAULT` the ones it runs without `--variants`.

End to end (`--end-to-end`): the headline variant's step, already warm, is timed again on batches from JPEG shards
through the training loader's GPU path (loader workers read the shards, nvJPEG decodes and the crops are made on
the GPU, two batches ahead on a side stream), exactly as `mixer run` feeds it with `data.decode: gpu`.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.bench import add_model_option
from pipeline.bench.data import bench_plan, bench_source
from pipeline.bench.gpu import (
    NUM_CLASSES,
    Batches,
    Result,
    Step,
    deepspeed_engine,
    engine_step,
    fixed,
    measure,
    one_gpu,
)  # fmt: skip
from pipeline.config import AugmentConfig
from pipeline.console import add_json_option, console, report, write_json
from pipeline.data.gpu import Prefetched, gpu_stream
from pipeline.data.transforms import normalize
from pipeline.flops import measure_matmul_flops, peak_flops, train_flops_per_image
from pipeline.models.mixer import REMAT, MixerSpec, MlpMixer

AUTOTUNE = "max-autotune-no-cudagraphs"
COMPILE_NAMES = {None: "", "default": " + compile", AUTOTUNE: " + max-autotune"}


@dataclass(frozen=True)
class Setup:
    """What every variant is built for: the shape, the micro batch, extra `deepspeed:` keys, our model's GELU."""

    spec: MixerSpec
    batch: int
    ds_options: dict
    gelu: str


@dataclass(frozen=True)
class Timm:
    """timm's MlpMixer as timm's train.py trains it (`plain_step`), eager or compiled; its GELU is the exact one."""

    compiled: bool = True

    @property
    def name(self) -> str:
        return "timm + compile" if self.compiled else "timm eager"

    def build(self, setup: Setup) -> Step:
        model = timm_model(setup.spec).cuda()
        return plain_step(torch.compile(model) if self.compiled else model)


@dataclass(frozen=True)
class Ours:
    """Our MlpMixer. `zero` None: trained by `plain_step`, as timm's is; else by DeepSpeed's engine at that ZeRO
    stage, as `mixer run` trains it (ZeRO-3 + compile is DeepCompile). `precision` (DeepSpeed's): bf16 weights with
    fp32 master copies, or fp32 weights under bf16 autocast. `fused_gelu` (model.fused_gelu) brings the tanh GELU
    whatever --gelu says."""

    zero: int | None = 2
    compile: str | None = "default"  # torch.compile's mode; None: eager
    precision: str = "autocast"
    stacked: bool = True
    remat: str = "none"
    fp8: str = "none"
    fused_gelu: bool = False

    @property
    def name(self) -> str:
        tags = ["autocast"] if self.zero is not None and self.precision == "autocast" else []
        tags += ["stacked"] * self.stacked + [f"remat {self.remat}"] * (self.remat != "none")
        tags += [f"fp8 {self.fp8}"] * (self.fp8 != "none") + ["fused GELU"] * self.fused_gelu
        compiled = COMPILE_NAMES[self.compile]
        if self.zero is None:
            return f"ours{compiled}{''.join(', ' + t for t in tags)} (no DeepSpeed)"
        listed = f" ({', '.join(tags)})" if tags else ""
        return f"ours DeepSpeed ZeRO-{self.zero}{compiled}{listed}"

    def build(self, setup: Setup) -> Step:
        gelu = "tanh" if self.fused_gelu else setup.gelu
        model = MlpMixer(setup.spec, NUM_CLASSES, gelu=gelu, stacked=self.stacked, remat=self.remat,
                         fused_gelu=self.fused_gelu)  # fmt: skip
        if self.zero is None:
            if self.fp8 != "none":
                from pipeline.engine import to_float8

                to_float8(model, self.fp8)
            model = model.cuda()
            return plain_step(model if self.compile is None else torch.compile(model, mode=self.compile))
        options = {**setup.ds_options, "precision": self.precision, "fp8": self.fp8, "compile": bool(self.compile)}
        engine = deepspeed_engine(model, setup.batch, self.zero, self.compile, options)
        return engine_step(engine, self.precision)


@dataclass(frozen=True)
class JaxPeer:
    """The JAX/Flax Mixer (`pipeline.bench.jax_peer`), timed in a process of its own."""

    name: str = "jax/flax"


JAX = JaxPeer()
Variant = Timm | Ours | JaxPeer
HEADLINE = Ours(zero=2)  # the step the paper configs run: ZeRO-2 + compile, autocast, stacked blocks
DEFAULT = (Timm(), JAX, HEADLINE, Ours(zero=None))
# Every variant `--variants` accepts, by name: none is made from a name, so a typo is a NameError or an unknown name
KNOWN: tuple[Variant, ...] = (
    Timm(compiled=False), *DEFAULT,
    # ours without DeepSpeed
    Ours(zero=None, stacked=False), Ours(zero=None, compile=AUTOTUNE, stacked=False),
    Ours(zero=None, fused_gelu=True), *(Ours(zero=None, remat=m) for m in REMAT[1:]),
    *(Ours(zero=None, stacked=False, fp8=r) for r in ("tensorwise", "rowwise")),
    # ours in DeepSpeed's engine, per ZeRO stage
    Ours(zero=0, stacked=False), Ours(zero=1, stacked=False), Ours(zero=1), Ours(zero=1, fused_gelu=True),
    Ours(zero=2, stacked=False), Ours(zero=2, fused_gelu=True), Ours(zero=3), Ours(zero=3, stacked=False),
    *(Ours(zero=z, remat=m) for z in (1, 2) for m in REMAT[1:]),
    *(Ours(zero=2, stacked=False, fp8=r) for r in ("tensorwise", "rowwise")),
    *(Ours(zero=z, compile=AUTOTUNE, stacked=False) for z in (1, 2)),
    *(Ours(zero=z, precision="bf16", stacked=False) for z in (0, 1, 2, 3)),
    *(Ours(zero=z, precision="bf16") for z in (2, 3)),
    Ours(zero=2, compile=None, precision="bf16", stacked=False), Ours(zero=3, compile=None, stacked=False),
    Ours(zero=3, compile=None, precision="bf16", stacked=False),
)  # fmt: skip
REGISTRY: dict[str, Variant] = {v.name: v for v in KNOWN}
# `--variants all`: one of each kind, for a survey of where the speed comes from
SURVEY = (
    Timm(compiled=False), Timm(), JAX,
    Ours(zero=None, stacked=False), Ours(zero=None), Ours(zero=None, compile=AUTOTUNE, stacked=False),
    HEADLINE, Ours(zero=1), Ours(zero=2, compile=AUTOTUNE, stacked=False), Ours(zero=2, stacked=False),
    Ours(zero=2, precision="bf16", stacked=False), Ours(zero=1, stacked=False), Ours(zero=0, stacked=False),
    Ours(zero=2, compile=None, precision="bf16", stacked=False), Ours(zero=3, compile=None, stacked=False),
)  # fmt: skip


def variants_named(names: list[str] | None) -> tuple[Variant, ...]:
    """The registry's variants for `--variants` (`all`: SURVEY; none: DEFAULT), in the order given."""
    if not names:
        return DEFAULT
    if names == ["all"]:
        return SURVEY
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {list(REGISTRY)}")
    return tuple(REGISTRY[n] for n in names)


def plain_step(model: torch.nn.Module) -> Step:
    """Autocast bf16 over fp32 weights, fused AdamW, clipping: how timm's train.py runs."""
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


def jax_missing() -> str | None:
    """Why the JAX/Flax peer cannot run here (None if it can)."""
    missing = [name for name in ("jax", "flax", "optax") if importlib.util.find_spec(name) is None]
    return f"{', '.join(missing)} not installed (pip install '.[bench]')" if missing else None


def measure_jax(model: str, batch: int, steps: int, warmup: int, gelu: str) -> Result:
    """The JAX/Flax step, timed as the others are, in its own process (its own GPU memory pool: ours is emptied
    first, and JAX allocates on demand)."""
    torch.cuda.empty_cache()
    cmd = [sys.executable, "-m", "pipeline.bench.jax_peer", "--model", model, "--batch", str(batch),
           "--steps", str(steps), "--warmup", str(warmup), "--gelu", gelu]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"the JAX/Flax peer failed (exit {done.returncode}): {done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{JAX.name} (jax {out['jax']}, flax {out['flax']}): {out['images_per_s']:.0f} img/s", flush=True)
    return Result(JAX.name, out["images_per_s"], out["step_ms"], out["peak_memory_gib"])


def run_train_bench(
    model: str,
    batch: int,
    steps: int,
    warmup: int,
    variants: tuple[Variant, ...] = DEFAULT,
    ds_options: dict | None = None,
    profile: bool = False,
    gelu: str = "exact",
    end_to_end: EndToEnd | None = None,
) -> dict:
    """Measure each variant in turn on one GPU; returns rows plus the headline numbers. `gelu`: our model's GELU
    (timm's is always the exact one). `end_to_end`: the headline variant again, fed from JPEG shards. The headline
    ("ours") is the first DeepSpeed variant asked for."""
    env, spec, images, labels = one_gpu("train", model, batch)
    setup = Setup(spec, batch, ds_options or {}, gelu)
    headline = next((v for v in variants if isinstance(v, Ours) and v.zero is not None), variants[-1])
    rows: list[Result] = []
    from_shards = None
    no_jax = jax_missing() if JAX in variants else None
    for variant in variants:
        if variant == JAX:
            if no_jax:
                print(f"{JAX.name}: left out, {no_jax}", flush=True)
            else:
                rows.append(measure_jax(model, batch, steps, warmup, gelu))
            continue
        torch.cuda.empty_cache()
        step = variant.build(setup)
        rows.append(measure(variant.name, step, fixed(images, labels), warmup, steps, profile))
        if end_to_end is not None and variant == headline:
            stream = shard_batches(spec, batch, end_to_end, env.device)
            try:
                from_shards = measure(f"{variant.name}, from JPEG shards", step, standardised(stream), warmup, steps,
                                      profile)  # fmt: skip
                rows.append(from_shards)
            finally:
                stream.close()
        del step
        gc.collect()
    return _summary(model, spec, batch, gelu, rows, headline.name, from_shards, end_to_end, no_jax)


def _summary(model, spec, batch, gelu, rows, headline, from_shards, end_to_end, no_jax) -> dict:
    """The rows with their MFU (against the matmul rate measured now, and the datasheet's), and the ratios of the
    headline against timm + compile (else the first row) and the JAX/Flax peer."""
    device = torch.device("cuda")
    measured = measure_matmul_flops(device, torch.bfloat16)
    datasheet, _ = peak_flops(device, torch.bfloat16)
    flops = train_flops_per_image(spec)
    by_name = {r.name: r for r in rows}
    ours = by_name[headline]
    baseline = by_name.get(Timm().name, rows[0])
    peer = by_name.get(JAX.name)
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


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train", help="training step vs timm + torch.compile and JAX/Flax on one GPU", description=command.__doc__
    )
    add_model_option(parser, "B/16")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed optimiser steps per variant")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    parser.add_argument(
        "--variants", nargs="*", help="variant names, or 'all' (default: timm + compile and jax/flax vs ours)"
    )
    add_json_option(parser)
    parser.add_argument("--bucket", type=float, default=5e7, help="DeepSpeed reduce/allgather bucket size (elements)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table for every variant")
    parser.add_argument(
        "--gelu", default="exact", choices=["exact", "tanh"], help="our model's GELU (model.gelu); timm's is exact"
    )
    parser.add_argument(
        "--end-to-end",
        action="store_true",
        help="also time the headline variant fed from JPEG shards through the loader's GPU path (data.decode: gpu)",
    )
    parser.add_argument("--workers", type=int, default=8, help="loader worker processes for --end-to-end")
    parser.add_argument("--shards", help="--end-to-end reads these (folder with index.json or a shard pattern)")
    parser.add_argument("--generate", type=int, default=8000, help="generated 500x375 JPEGs when --shards is not given")
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    """Training throughput and MFU of the project's step vs timm's MlpMixer + torch.compile (same process) and the
    JAX/Flax Mixer (`jax/flax`, a subprocess)."""
    variants = variants_named(args.variants)
    ds_options = {"reduce_bucket_size": int(args.bucket)}  # overlap_comm is off on one rank
    end_to_end = EndToEnd(args.workers, args.shards, args.generate) if args.end_to_end else None
    result = run_train_bench(
        args.model, args.batch, args.steps, args.warmup, variants, ds_options, args.profile, args.gelu, end_to_end
    )
    peer = result["jax_images_per_s"]
    columns = ["variant", "img/s", "step ms", "MFU", "peak GiB", f"vs {result['baseline']}"]
    columns += [f"vs {JAX.name}"] if peer else []
    rows = [
        [row["name"], f"{row['images_per_s']:.0f}", f"{row['step_ms']:.1f}", f"{row['mfu']:.1%}",
         f"{row['peak_memory_gib']:.1f}",
         *(f"{row['images_per_s'] / base:.2f}x" for base in (result["baseline_images_per_s"], peer) if base)]
        for row in result["rows"]
    ]  # fmt: skip
    title = (
        f"Mixer-{args.model}, batch {args.batch}, {args.gelu} GELU in ours, {result['device']} "
        f"(bf16 matmul {result['measured_bf16_matmul_tflops']:.0f} TFLOP/s measured)"
    )
    report(title, columns, rows, result, None)
    if result["jax_left_out"]:
        console.print(f"{JAX.name} left out: {result['jax_left_out']}")
    if end_to_end is not None:
        console.print(
            f"from JPEG shards ({args.workers} loader workers, GPU decode): {result['end_to_end_images_per_s']:.0f} "
            f"img/s, {result['end_to_end_ratio']:.1%} of the same step on synthetic input"
        )
    write_json(result, args.json)
    return 0
