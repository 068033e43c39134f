"""The GPU decode path's logic, run on the CPU device (the same torchvision calls; CUDA adds nvJPEG)."""

import io

import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.config import AugmentConfig
from pipeline.data import gpu
from pipeline.data.gpu import GpuAugment, GpuPrepare, Prefetched, pack, resized_crops
from pipeline.data.index import read_index
from pipeline.data.stream import StreamPlan, TrainStream
from pipeline.data.transforms import decode


def test_packed_batch_is_cropped_flipped_and_bad_jpegs_replaced(shapes_shards):
    index = read_index(shapes_shards)
    samples = [dict(s) for s, _ in zip(wds.WebDataset(index.urls[:1], shardshuffle=False), range(12))]
    png = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(png, "PNG")
    samples[3] = {"__key__": "red", "png": png.getvalue(), "cls": b"1"}
    samples[5]["jpg"] = samples[5]["jpg"][:-60]  # the header parses, the body does not decode
    grey = io.BytesIO()
    Image.new("L", (30, 20), 77).save(grey, "JPEG")
    samples[7] = {"__key__": "grey", "jpg": grey.getvalue(), "cls": b"2"}  # one channel: fills all three
    torch.manual_seed(0)
    items = [GpuPrepare(AugmentConfig(crop="resize", flip=False))(s, ())[0] for s in samples]
    batch = pack(items)
    assert batch["bytes"].dim() == 1 and len(batch["offsets"]) == 12 and batch["jpeg_index"].tolist()[3] == 4
    augment = GpuAugment(AugmentConfig(), 16, torch.device("cpu"))
    out = augment(batch)
    assert out.shape == (12, 3, 16, 16) and out.dtype == torch.uint8 and augment.failed == 1
    assert (out[3, 0] > 150).all() and (out[3, 1] < 60).all()  # the PNG, decoded by the worker: red
    assert ((out[7].int() - 77).abs() <= 2).all()
    expected = decode(samples[0]["jpg"]).float()[None]
    expected = torch.nn.functional.interpolate(expected, size=(16, 16), mode="bilinear", antialias=True)
    assert (out[0].float() - expected[0].round()).abs().max() <= 1  # whole-image "resize" crop


@pytest.mark.parametrize(
    ("budget", "dtype"),
    [(gpu.PAD_BUDGET, torch.float32), (3 * 70 * 90 * 4 * 2, torch.float32), (gpu.PAD_BUDGET, torch.float16)],
    ids=["one-group", "groups-of-two", "float16"],
)
def test_batched_resized_crops_match_antialiased_interpolate_per_image(budget, dtype, monkeypatch):
    monkeypatch.setattr(gpu, "PAD_BUDGET", budget)
    g = torch.Generator().manual_seed(0)
    images, params = [], []
    for k in range(9):
        h, w = 40 + 5 * k, 90 - 4 * k
        smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=(h, w), mode="bicubic")
        images.append(((smooth[0] + 0.3 * torch.rand(3, h, w, generator=g)).clamp(0, 1) * 255).round().byte())
        ch, cw = int(torch.randint(6, h + 1, (), generator=g)), int(torch.randint(6, w + 1, (), generator=g))
        top, left = (
            int(torch.randint(0, h - ch + 1, (), generator=g)),
            int(torch.randint(0, w - cw + 1, (), generator=g)),
        )
        params.append([top, left, ch, cw, k % 2])
    size = 24  # crops from 6 (enlarged) to 90 pixels (shrunk) a side
    out = resized_crops(images, torch.tensor(params), size, dtype)
    assert out.shape == (9, 3, size, size) and out.dtype == torch.uint8
    for image, (top, left, ch, cw, flip), got in zip(images, params, out):
        crop = image[None, :, top : top + ch, left : left + cw].float()
        expected = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0]
        expected = expected.flip(-1) if flip else expected
        assert (got.float() - expected.round()).abs().max() <= 1
        assert (got.float() - expected).abs().mean() < 0.3


def test_gpu_prepared_stream_resumes_exactly(shapes_shards):
    index = read_index(shapes_shards)
    from pipeline.data.index import ShardIndex

    source = ShardIndex("s", tuple(index.urls), index.counts)
    plan = StreamPlan((source,), "split", 0, 1, 1, 8, 3, 50, 300)
    prepare = GpuPrepare(AugmentConfig(randaugment_magnitude=5))
    augment = GpuAugment(AugmentConfig(randaugment_magnitude=5), 16, torch.device("cpu"))

    def run(stream, n):
        out = []
        for step in range(n):
            torch.manual_seed(step)  # the training loop seeds per step (RandAugment draws on this side)
            out.append(augment(next(stream)[0]))
        return out

    with TrainStream(plan, prepare, collate=pack) as stream:
        reference = run(stream, 10)
    with TrainStream(plan, prepare, collate=pack) as stream:
        head = run(stream, 4)
        state = stream.state()
    with TrainStream(plan, prepare, collate=pack, state=state) as stream:
        tail = []
        for step in range(4, 10):
            torch.manual_seed(step)
            tail.append(augment(next(stream)[0]))
    assert [torch.equal(a, b) for a, b in zip(head + tail, reference)] == [True] * 10


def test_prefetched_stream_hands_out_the_same_batches_and_the_position_of_those(shapes_shards):
    """One batch ahead on a thread: same images (RandAugment still drawn per step by the caller), and the saved
    position and bad counts are those of the batches handed out, so a resume continues where training was."""
    index = read_index(shapes_shards)
    from pipeline.data.index import ShardIndex

    source = ShardIndex("s", tuple(index.urls), index.counts)
    plan = StreamPlan((source,), "split", 0, 1, 1, 8, 2, 50, 300)
    cfg = AugmentConfig(randaugment_magnitude=5)
    augment = GpuAugment(cfg, 16, torch.device("cpu"))

    def run(stream, steps):
        out = []
        for step in steps:
            torch.manual_seed(step)
            images, labels = next(stream)
            out.append((images.clone(), labels))
        return out

    reference = []
    with TrainStream(plan, GpuPrepare(cfg), collate=pack) as plain:
        for step in range(8):
            torch.manual_seed(step)
            batch, labels = next(plain)
            reference.append((augment(batch), labels))
    with TrainStream(plan, GpuPrepare(cfg), collate=pack) as plain:
        for _ in range(3):
            next(plain)
        reference_state = plain.state()
    prefetched = Prefetched(TrainStream(plan, GpuPrepare(cfg), collate=pack), augment)
    head = run(prefetched, range(3))
    state = prefetched.state()
    prefetched.close()
    assert state == reference_state and prefetched.read == reference_state["read"]
    resumed = Prefetched(TrainStream(plan, GpuPrepare(cfg), collate=pack, state=state), augment)
    tail = run(resumed, range(3, 8))
    resumed.close()
    for (a, la), (b, lb) in zip(head + tail, reference, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_jpegs_that_only_the_gpu_finds_undecodable_are_bad_samples_and_stop_the_run(tmp_path, shapes_shards):
    """A JPEG whose header reads passes the worker (which reads only the header on this path); when its data then
    fails to decode on the device it is counted, named and judged like any other bad sample, not silently replaced."""
    from pipeline.data.index import DataError, ShardIndex

    samples = [dict(s) for s in wds.WebDataset(read_index(shapes_shards).urls, shardshuffle=False)][:200]
    shard = tmp_path / "cut.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i, s in enumerate(samples):
            jpg = s["jpg"][:-60] if i % 8 == 5 else s["jpg"]  # 1 in 8: the header parses, the body does not
            sink.write({"__key__": s["__key__"], "jpg": jpg, "cls": s["cls"]})
    source = ShardIndex("cut", (str(shard),), (200,))
    cfg = AugmentConfig(crop="resize", flip=False)
    augment = GpuAugment(cfg, 16, torch.device("cpu"))

    plan = StreamPlan((source,), "split", 0, 1, 0, 8, 2, 50, 200)
    stream = Prefetched(TrainStream(plan, GpuPrepare(cfg), collate=pack, max_bad_fraction=1.0), augment)
    for _ in range(4):
        next(stream)
    events = list(stream.new_bad)
    stream.close()
    assert stream.bad == len(events) > 0 and all("nvJPEG" in e["reason"] for e in events)
    assert {e["key"] for e in events} <= {s["__key__"] for i, s in enumerate(samples) if i % 8 == 5}
    assert all(e["url"] == str(shard) for e in events)

    stream = Prefetched(TrainStream(plan, GpuPrepare(cfg), collate=pack, max_bad_fraction=0.01), augment)
    with pytest.raises(DataError, match=r"samples read are bad .* > data.max_bad_fraction"):
        for _ in range(25):  # 12.5% bad: judged once 20 are bad, at 160 samples read
            next(stream)
    stream.close()
