"""`mixer bench data`: loader throughput from shards, against a naive baseline measured in the same run.

Baseline: one process, plain webdataset iteration, PIL open + convert("RGB") + RandomResizedCrop(224) + ToTensor —
what a first loader looks like. Ours: the training stream (`TrainStream`) with N workers, CPU path (torchvision
decode to uint8, transforms v2 on uint8, batches stay uint8 until the device) or GPU path (nvJPEG batch decode +
augmentation on the GPU). Without `--shards`, JPEGs of ImageNet's typical 500x375 size are generated first.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms as T
import webdataset as wds
from PIL import Image

from pipeline.config import AugmentConfig
from pipeline.data.sources import Source, ensure_index, read_index_file
from pipeline.data.stream import StreamPlan, TrainStream, cpu_prepare
from pipeline.data.synthetic import make_photo_shards
from pipeline.data.transforms import normalize, stack_images, train_transform


def naive_baseline(urls: list[str], images: int, image_size: int) -> float:
    """Images/s of the naive single-process loader (one intra-op thread: one core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transform = T.Compose([T.RandomResizedCrop(image_size), T.ToTensor()])
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).repeat()
    start = 0.0
    for done, sample in enumerate(dataset):
        if done == 20:  # warm-up: file cache, first allocations
            start = time.perf_counter()
        if done == images + 20:
            break
        transform(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
    torch.set_num_threads(threads)
    return images / (time.perf_counter() - start)


def loader_rate(
    source: Source, *, workers: int, batch: int, batches: int, image_size: int, decode: str, randaugment: int
) -> float:
    """Images/s of the training stream, including the step to model input on the device."""
    augment = AugmentConfig(randaugment_magnitude=randaugment)
    # As in training: batches go to the GPU (when there is one) and become float input there.
    device = torch.device("cuda" if decode == "gpu" or torch.cuda.is_available() else "cpu")
    # A long nominal epoch: at each epoch start every worker refills its shuffle block before its first batch, a
    # stall that a real epoch (thousands of batches) amortises but a small benchmark set would not.
    plan = StreamPlan((source,), "resampled", 0, 1, workers, batch, 0, 1000, 100 * source.num_samples)
    if decode == "gpu":
        from pipeline.data.gpu import GpuAugment, gpu_prepare, pack

        finish = GpuAugment(augment, image_size, device)
        stream = TrainStream(plan, gpu_prepare(augment), collate=pack, prefetch=4)
    else:
        finish = None
        prepare = cpu_prepare(train_transform(augment, image_size))
        stream = TrainStream(plan, prepare, collate=stack_images, prefetch=4)
    warmup = max(3, workers)
    with stream:
        for i in range(warmup + batches):
            if i == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            images, labels = next(stream)
            if finish is not None:
                images = finish(images)
            normalize(images.to(device, non_blocking=True))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return batches * batch / (time.perf_counter() - start)


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
    if shards is None:
        cache = Path(os.environ.get("MIXER_BENCH_CACHE", tempfile.gettempdir())) / f"mixer-bench-photos-{generate}"
        shards = str(make_photo_shards(cache, generate))
    source = read_index_file(ensure_index(shards, None, Path(tempfile.mkdtemp(prefix="mixer-bench-index-"))))
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
    baseline = sum(baseline_runs) / len(baseline_runs)
    cores = max(1, workers)
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
        "images_per_s": ours,
        "baseline_images_per_s": baseline,
        "baseline_runs_images_per_s": baseline_runs,
        "images_per_s_per_worker": ours / cores,
        "per_core_speedup": ours / cores / baseline,
    }
