"""`mixer bench data`: loader throughput from shards, against a naive baseline measured in the same run.

Baseline: one process, plain webdataset iteration, PIL open + convert("RGB") + RandomResizedCrop(224) + ToTensor —
what a first loader looks like. Ours: the training stream (`TrainStream`) with N workers, CPU path (torchvision
decode to uint8, transforms v2 on uint8, batches stay uint8 until the device) or GPU path (nvJPEG batch decode +
augmentation on the GPU). Without `--shards`, JPEGs of ImageNet's typical 500x375 size are generated first.

"Per core" compares images per CPU-second: ours counts the workers' CPU time and the training process's (which
receives the batches and turns them into model input), the baseline its one process's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision.transforms as T
import webdataset as wds
from PIL import Image

from pipeline.config import AugmentConfig
from pipeline.console import add_json_option, report
from pipeline.data.index import ShardIndex, read_index
from pipeline.data.sources import ensure_index
from pipeline.data.stream import StreamPlan, TrainStream, cpu_prepare
from pipeline.data.synthetic import make_photo_shards
from pipeline.data.transforms import normalize, stack_images, train_transform


class CpuClock:
    """Wall time, and CPU time of this process and of its live child processes (loader workers), since creation.

    CPU time is what "per core" means: it counts the work an image took in every process involved, and not the
    time a worker waited for a core that another process held."""

    def __init__(self) -> None:
        self.start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float]:
        ticks = 0
        for child in multiprocessing.active_children():
            try:
                with open(f"/proc/{child.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # not Linux, or the child just ended: it is not counted
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return time.perf_counter(), time.process_time(), ticks / os.sysconf("SC_CLK_TCK")

    def elapsed(self) -> tuple[float, float, float]:
        """Seconds since creation: (wall clock, this process's CPU, the child processes' CPU)."""
        return tuple(now - then for now, then in zip(self._now(), self.start, strict=True))


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """This process on one intra-op thread, as each loader worker runs: one core's work, and no idle OpenMP threads
    spinning, which CPU time would count as work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def bench_source(shards: str | None, generate: int) -> ShardIndex:
    """The shards to read: `shards` (a folder with index.json or a shard pattern), or `generate` 500x375 JPEGs made
    once under $MIXER_BENCH_CACHE (default: the temporary folder) and reused."""
    if shards is None:
        cache = Path(os.environ.get("MIXER_BENCH_CACHE", tempfile.gettempdir())) / f"mixer-bench-photos-{generate}"
        shards = str(make_photo_shards(cache, generate))
    return read_index(ensure_index(shards, None, Path(tempfile.mkdtemp(prefix="mixer-bench-index-"))))


def bench_plan(source: ShardIndex, workers: int, batch: int) -> StreamPlan:
    """Resampled training order over `source` for one rank, in epochs as long as a real corpus's (thousands of
    batches) rather than the benchmark set's."""
    return StreamPlan((source,), "resampled", 0, 1, workers, batch, 0, 1000, 100 * source.num_samples)


def naive_baseline(urls: list[str], images: int, image_size: int) -> tuple[float, float]:
    """Images/s and images per CPU-second of the naive single-process loader (one intra-op thread: one core)."""
    transform = T.Compose([T.RandomResizedCrop(image_size), T.ToTensor()])
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).repeat()
    clock = None
    with one_intra_op_thread():
        for done, sample in enumerate(dataset):
            if done == 20:  # warm-up: file cache, first allocations
                clock = CpuClock()
            if done == images + 20:
                break
            transform(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        wall, cpu, _ = clock.elapsed()
    return images / wall, images / cpu


def loader_rate(
    source: ShardIndex, *, workers: int, batch: int, batches: int, image_size: int, decode: str, randaugment: int
) -> dict:
    """Images/s of the training stream, including the step to model input on the device, and the CPU seconds
    its workers and this process spent per image."""
    augment = AugmentConfig(randaugment_magnitude=randaugment)
    # As in training: batches go to the GPU (when there is one) and become float input there.
    device = torch.device("cuda" if decode == "gpu" or torch.cuda.is_available() else "cpu")
    plan = bench_plan(source, workers, batch)
    if decode == "gpu":
        from pipeline.data.gpu import GpuAugment, gpu_prepare, pack

        finish = GpuAugment(augment, image_size, device)
        stream = TrainStream(plan, gpu_prepare(augment), collate=pack, prefetch=4)
    else:
        finish = None
        prepare = cpu_prepare(train_transform(augment, image_size))
        stream = TrainStream(plan, prepare, collate=stack_images, prefetch=4)
    warmup = max(3, workers)
    with one_intra_op_thread(), stream:
        for i in range(warmup + batches):
            if i == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                clock = CpuClock()
            images, labels = next(stream)
            if finish is not None:
                images = finish(images)
            normalize(images.to(device, non_blocking=True))
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, main_cpu, workers_cpu = clock.elapsed()
    count = batches * batch
    return {
        "images_per_s": count / wall,
        "images_per_cpu_s": count / (main_cpu + workers_cpu),
        "worker_cpu_ms_per_image": 1e3 * workers_cpu / count,
        "main_cpu_ms_per_image": 1e3 * main_cpu / count,
    }


def run_data_bench(
    shards: str | None,
    *,
    workers: int,
    batch: int,
    batches: int,
    image_size: int,
    decode: str,
    randaugment: int,
    baseline_images: int,
    generate: int,
) -> dict:
    source = bench_source(shards, generate)
    # The naive loader runs before and after ours and counts as the mean: one core's speed drifts over a minute.
    baseline_runs = [naive_baseline(list(source.urls), baseline_images, image_size)]
    ours = loader_rate(
        source,
        workers=workers,
        batch=batch,
        batches=batches,
        image_size=image_size,
        decode=decode,
        randaugment=randaugment,
    )
    baseline_runs.append(naive_baseline(list(source.urls), baseline_images, image_size))
    baseline = sum(wall for wall, _ in baseline_runs) / len(baseline_runs)
    baseline_per_cpu_s = sum(cpu for _, cpu in baseline_runs) / len(baseline_runs)
    per_worker = ours["images_per_s"] / max(1, workers)
    return {
        "shards": shards,
        "samples": source.num_samples,
        "decode": decode,
        "workers": workers,
        "batch": batch,
        "image_size": image_size,
        "randaugment": randaugment,
        "device": torch.cuda.get_device_name() if decode == "gpu" else "cpu",
        "cpu_cores": os.cpu_count(),
        **ours,
        "baseline_images_per_s": baseline,
        "baseline_runs_images_per_s": [wall for wall, _ in baseline_runs],
        "baseline_images_per_cpu_s": baseline_per_cpu_s,
        "baseline_runs_images_per_cpu_s": [cpu for _, cpu in baseline_runs],
        "images_per_s_per_worker": per_worker,
        "per_worker_speedup": per_worker / baseline,
        "per_core_speedup": ours["images_per_cpu_s"] / baseline_per_cpu_s,
    }


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="loader images/s vs a naive PIL loader", description=command.__doc__)
    parser.add_argument("--shards", help="a folder with index.json or a shard pattern (default: generated JPEGs)")
    parser.add_argument("--generate", type=int, default=4000, help="generated 500x375 JPEGs when --shards is not given")
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes")
    parser.add_argument("--decode", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=20, help="timed batches")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--randaugment", type=int, default=0, help="RandAugment magnitude (0: off)")
    parser.add_argument(
        "--baseline-images",
        type=int,
        default=600,
        help="images the naive loader decodes (before ours, and again after)",
    )
    add_json_option(parser)
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    """Loader images/s from shards vs a naive single-process PIL loader, measured in the same run."""
    result = run_data_bench(
        args.shards,
        workers=args.workers,
        batch=args.batch,
        batches=args.batches,
        image_size=args.image_size,
        decode=args.decode,
        randaugment=args.randaugment,
        baseline_images=args.baseline_images,
        generate=args.generate,
    )
    rows = [
        ["naive PIL (1 process)", "0", f"{result['baseline_images_per_s']:.0f}", "",
         f"{result['baseline_images_per_cpu_s']:.0f}", "1.00x"],
        [f"ours, {result['decode']} decode", str(result["workers"]), f"{result['images_per_s']:.0f}",
         f"{result['images_per_s_per_worker']:.0f} ({result['per_worker_speedup']:.2f}x)",
         f"{result['images_per_cpu_s']:.0f}", f"{result['per_core_speedup']:.2f}x"],
    ]  # fmt: skip
    columns = ("loader", "workers", "img/s", "img/s per worker", "img per CPU-s", "per core vs naive")
    report(f"loader, {result['samples']} samples, {result['image_size']}px crops", columns, rows, result, args.json)
    return 0
