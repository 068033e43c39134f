"""`data.decode: gpu` on a CUDA device: nvJPEG decode and the batched crops against the CPU path on the same
samples, and the prefetching side stream handing out the loader's batches in order."""

import pytest
import torch
import webdataset as wds

from pipeline.config import AugmentConfig
from pipeline.data.gpu import GpuAugment, GpuPrepare, Prefetched, pack
from pipeline.data.index import ShardIndex, read_index
from pipeline.data.stream import CpuPrepare, StreamPlan, TrainStream
from pipeline.data.transforms import train_transform

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
TOLERANCE = 5.0  # mean absolute difference, in 0-255 levels, between the GPU and the CPU path's pixels


def _samples(shards, n):
    index = read_index(shards)
    return [dict(s) for s, _ in zip(wds.WebDataset(index.urls[:1], shardshuffle=False), range(n))]


@pytest.mark.parametrize(
    "cfg",
    [AugmentConfig(crop="resize", flip=False), AugmentConfig(crop_scale=(0.3, 1.0))],
    ids=["resize", "inception-crop-and-flip"],
)
def test_gpu_decode_and_crops_match_the_cpu_path_on_the_same_samples(gpu_shapes, cfg):
    """Both paths draw the crop box and flip in the same order from the same seed, so they must show the same
    pixels, up to the decoders' differences: nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by 2-4
    levels on average on these small noisy JPEGs (2.4 and 3.8 measured on an H200; the GPU path's crops alone,
    run on the CPU, are 0.2 from the CPU path's), while a crop one pixel off differs by ~10 and a mirrored one by
    20-30."""
    samples = _samples(gpu_shapes / "train", 64)
    torch.manual_seed(0)
    items, gpu_labels = zip(*(GpuPrepare(cfg)(s, ()) for s in samples), strict=True)
    on_gpu = GpuAugment(cfg, 24, CUDA)(pack(list(items)))
    torch.manual_seed(0)
    prepare = CpuPrepare(train_transform(cfg, 24))
    cpu_images, cpu_labels = zip(*(prepare(s, ()) for s in samples), strict=True)
    on_cpu = torch.stack(cpu_images).float()
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8 and on_gpu.shape == (64, 3, 24, 24)
    assert list(gpu_labels) == list(cpu_labels)
    on_gpu = on_gpu.cpu().float()
    assert (on_gpu - on_cpu).abs().mean() < TOLERANCE
    # The tolerance tells crops apart: the same batch shifted by one pixel, or mirrored, is outside it.
    assert (on_gpu.roll(1, -1) - on_cpu).abs().mean() > TOLERANCE and (on_gpu.flip(-1) - on_cpu).abs().mean() > 10


def test_prefetched_side_stream_hands_out_the_loaders_batches_in_order(gpu_shapes):
    """Two batches decoded ahead on their own CUDA stream and thread: the same images and labels, in the same order,
    as decoding each batch on the training stream when it is needed."""
    index = read_index(gpu_shapes / "train")
    source = ShardIndex("s", tuple(index.urls), index.counts)
    plan = StreamPlan((source,), "split", 0, 1, 2, 64, 5, 200, 2048)
    cfg = AugmentConfig(randaugment_magnitude=5)
    augment = GpuAugment(cfg, 32, CUDA)
    reference = []
    with TrainStream(plan, GpuPrepare(cfg), collate=pack) as plain:
        for step in range(12):
            torch.manual_seed(step)  # the training loop seeds RandAugment per step
            batch, labels = next(plain)
            reference.append((augment(batch).cpu(), labels))
    prefetched = Prefetched(TrainStream(plan, GpuPrepare(cfg), collate=pack), augment)
    try:
        for step, (images, labels) in enumerate(reference):
            torch.manual_seed(step)
            got, got_labels = next(prefetched)
            assert got.device.type == "cuda" and got_labels.device.type == "cuda"
            assert torch.equal(got.cpu(), images) and torch.equal(got_labels.cpu(), labels), step
    finally:
        prefetched.close()
