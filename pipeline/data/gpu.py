"""`data.decode: gpu`: JPEG bytes decoded in batches by nvJPEG and augmented on the GPU.

Loader workers only read shards, parse each JPEG's header for its size and draw the augmentation parameters (crop
box, flip) under the batch's seed, so replays stay exact. The training process decodes the batch with
`torchvision.io.decode_jpeg(device="cuda")`, crops and resizes every image with antialiasing, flips, and applies
RandAugment when configured. Images that are not JPEG are decoded by the worker and shipped as pixels.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop, v2

from pipeline.config import AugmentConfig
from pipeline.data.stream import BadSample, StreamPlan, TrainStream, image_and_label
from pipeline.data.transforms import decode

log = logging.getLogger(__name__)

# Padding a batch of differently sized images goes through torch.nested's strided layout (ragged height and width),
# which warns once per process that its API is a prototype.
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")

JPEG_MAGIC = b"\xff\xd8"

# One image as a worker prepares it: encoded JPEG bytes (1-D uint8) or decoded pixels (3, H, W), then
# (top, left, height, width, flip); `pack` makes a batch of them.
GpuItem = tuple[torch.Tensor, tuple[int, int, int, int, bool]]


def header_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the image header alone."""
    with Image.open(io.BytesIO(data)) as im:
        return im.height, im.width


class GpuPrepare:
    """Worker side: the bytes to decode and this image's crop box and flip."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    def __call__(self, sample: dict, classes: tuple[str, ...]) -> tuple[GpuItem, int]:
        cfg = self.cfg
        data, label = image_and_label(sample, classes)
        try:
            if data[:2] == JPEG_MAGIC:
                height, width = header_size(data)
                payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            else:
                payload = decode(data)
                height, width = payload.shape[-2:]
        except (OSError, RuntimeError, SyntaxError) as err:
            raise BadSample(f"image does not decode: {err}") from err
        if cfg.crop == "inception":
            shape_only = torch.empty(1).expand(3, height, width)  # get_params reads the size, not the pixels
            top, left, h, w = RandomResizedCrop.get_params(shape_only, list(cfg.crop_scale), [3 / 4, 4 / 3])
        else:
            top, left, h, w = 0, 0, height, width
        flip = bool(cfg.flip and torch.rand(()) < 0.5)
        return (payload, (top, left, h, w, flip)), label


gpu_prepare = GpuPrepare


def pack(items: list[GpuItem]) -> dict:
    """A worker's batch as a few tensors (one shared-memory transfer each, not one per image): all JPEG bytes
    concatenated with their offsets, the crop/flip parameters, and the rare non-JPEG images as pixels."""
    jpeg = [(i, payload) for i, (payload, _) in enumerate(items) if payload.dim() == 1]
    sizes = torch.tensor([0] + [p.numel() for _, p in jpeg], dtype=torch.int64)
    return {
        "bytes": torch.cat([p for _, p in jpeg]) if jpeg else torch.empty(0, dtype=torch.uint8),
        "offsets": sizes.cumsum(0),
        "jpeg_index": torch.tensor([i for i, _ in jpeg], dtype=torch.int64),
        "params": torch.tensor([list(params[:4]) + [int(params[4])] for _, params in items], dtype=torch.int64),
        "pixels": [(i, payload) for i, (payload, _) in enumerate(items) if payload.dim() == 3],
    }


def resize_weights(start: torch.Tensor, length: torch.Tensor, extent: int, size: int) -> torch.Tensor:
    """(N, size, extent) matrices that resize the window [start, start + length) of an axis of `extent` pixels to
    `size` pixels: the triangle filter of antialiased bilinear resizing, stretched by the scale when shrinking, cut
    to the window and normalised per output pixel (as `interpolate(mode="bilinear", antialias=True)` weighs)."""
    scale = (length.float() / size)[:, None, None]
    support = scale.clamp(min=1.0)
    centre = scale * (torch.arange(size, dtype=torch.float32, device=start.device)[None, :, None] + 0.5)
    offset = torch.arange(extent, dtype=torch.float32, device=start.device)[None, None, :] - start[:, None, None]
    weight = (1 - ((offset + 0.5 - centre) / support).abs()).clamp_(min=0)
    weight.mul_((offset >= 0) & (offset < length[:, None, None]))
    return weight.div_(weight.sum(-1, keepdim=True))


def resized_crops(
    images: list[torch.Tensor], params: torch.Tensor, size: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Crop, resize (antialiased bilinear) and flip a batch of uint8 (3, H, W) images of any sizes into one
    (N, 3, size, size) uint8 batch, with a few batched kernels instead of several per image.

    `params` rows are (top, left, height, width, flip). Each resize is two matrix products, rows then columns, with
    weights that select the crop and, for a flip, list the output columns backwards; images are zero-padded to the
    largest of their group, a group being as many as fit `PAD_BUDGET` bytes of padded pixels. The padding is two
    calls for the whole group (a nested tensor of the images, then its padded form), not a copy per image: this
    runs on the decoding thread, where every Python-level call per image would take the interpreter lock from the
    training loop. On CUDA the products run in float16 on tensor cores unless `dtype` says otherwise (pixel values
    0-255 are exact in it; the weights keep ~3 significant digits: a pixel may come out one level off)."""
    device = images[0].device
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    itemsize = dtype.itemsize
    params = params.to(device, non_blocking=True)
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device=device)
    first = 0
    while first < len(images):
        height = width = last = 0
        for last in range(first, len(images)):  # the group: images[first:last + 1]
            h, w = max(height, images[last].shape[-2]), max(width, images[last].shape[-1])
            if last > first and (last - first + 1) * 3 * h * w * itemsize > PAD_BUDGET:
                last -= 1
                break
            height, width = h, w
        group = images[first : last + 1]  # all RGB: nvJPEG and the workers decode to three channels
        padded = torch.nested.as_nested_tensor(group, dtype=dtype).to_padded_tensor(0.0)  # (n, 3, height, width)
        top, left, h, w, flip = params[first : last + 1].unbind(1)
        rows = resize_weights(top, h, height, size).to(dtype)  # (n, size, height)
        cols = resize_weights(left, w, width, size).to(dtype)  # (n, size, width)
        cols = torch.where(flip.bool()[:, None, None], cols.flip(1), cols)
        resized = rows[:, None] @ (padded @ cols.transpose(1, 2)[:, None])  # (n, 3, size, size)
        out[first : last + 1] = resized.round_().clamp_(0, 255)
        first = last + 1
    return out


# Bytes of padded pixels resized at once (a group of 500x375 images: ~170 in float32, all of a batch of 256 in
# float16).
PAD_BUDGET = 512 << 20


class GpuAugment:
    """Training-process side: a packed batch (`pack`) -> (B, 3, S, S) uint8 on the device.

    RandAugment, when on, draws its two operations per group of `RANDAUGMENT_GROUP` images (one call per group;
    per image it would cost a dozen kernel launches each); the CPU path draws them per image."""

    RANDAUGMENT_GROUP = 16

    def __init__(self, cfg: AugmentConfig, image_size: int, device: torch.device) -> None:
        self.size, self.device = image_size, device
        self.randaugment = v2.RandAugment(2, cfg.randaugment_magnitude) if cfg.randaugment_magnitude > 0 else None
        self.failed = 0  # JPEGs nvJPEG refused; each was replaced by another image of its batch
        self.last_failed: list[int] = []  # their places in the last batch `crops` made

    def _decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if not encoded:
            return []
        try:  # RGB: a greyscale JPEG comes out with its one channel in all three
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for data in encoded:  # find the culprit(s); keep the rest
                try:
                    out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError as err:
                    log.warning("nvJPEG could not decode an image (%s); replaced by another of the batch", err)
                    out.append(None)
            return out

    def __call__(self, batch: dict) -> torch.Tensor:
        return self.randomly_augment(self.crops(batch))

    def crops(self, batch: dict) -> torch.Tensor:
        """Decode, crop, resize and flip: no random draws (the worker drew the boxes and flips), so this part may
        run on another thread (`Prefetched`)."""
        params = batch["params"]
        n = len(params)
        encoded = list(batch["bytes"].split(batch["offsets"].diff().tolist()))  # views, made in one call
        images: list[torch.Tensor | None] = [None] * n
        for i, image in zip(batch["jpeg_index"].tolist(), self._decode(encoded)):
            images[i] = image
        for i, pixels in batch["pixels"]:
            images[i] = pixels.to(self.device, non_blocking=True)
        self.last_failed = [i for i, image in enumerate(images) if image is None]
        good = [i for i, image in enumerate(images) if image is not None]
        if not good:
            raise BadSample("no image of the batch decodes")
        self.failed += len(self.last_failed)
        sources = [i if images[i] is not None else good[i % len(good)] for i in range(n)]
        return resized_crops([images[i] for i in sources], params[sources], self.size)

    def randomly_augment(self, out: torch.Tensor) -> torch.Tensor:
        """RandAugment when configured, drawn from the caller's (per-step seeded) random state."""
        if self.randaugment is not None:
            for g in range(0, len(out), self.RANDAUGMENT_GROUP):
                out[g : g + self.RANDAUGMENT_GROUP] = self.randaugment(out[g : g + self.RANDAUGMENT_GROUP])
        return out


class Prefetched:
    """A training stream `AHEAD` batches ahead on the GPU: a thread takes the next batches from `stream` and decodes
    and crops them (`GpuAugment.crops`) on a CUDA stream of its own while the current training step runs.

    Decoding 256 JPEGs keeps the host busy for tens of milliseconds (nvJPEG copies and waits per image) and launches
    hundreds of small kernels; done between steps, the GPU would wait for all of it. With two batches in hand, a
    batch that takes longer than a step (the thread shares the GPU and the interpreter with the step) does not hold
    the step up. The position (`state`) and the bad-data counts are those of the batches handed out, not of those
    prefetched, so checkpoints stay exact."""

    AHEAD = 2

    def __init__(self, stream: TrainStream, augment: GpuAugment) -> None:
        self.stream, self.augment = stream, augment
        self.plan = stream.plan
        self.side = torch.cuda.Stream(augment.device) if augment.device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-decode")
        self._state = stream.state()
        self.new_bad: deque[dict] = deque(maxlen=1000)
        # The first batch here: the loader's worker processes must be started from the main thread (signal handlers).
        first: Future = Future()
        first.set_result(self._load())
        self._ahead: deque[Future] = deque([first])
        self._ahead.extend(self.pool.submit(self._load) for _ in range(self.AHEAD - 1))

    def _load(self) -> tuple:
        batch, labels = next(self.stream)
        keys = list(self.stream.last_keys)
        if self.side is None:  # on the CPU (tests): the same hand-over, without streams
            images, ready = self.augment.crops(batch), None
        else:
            # nvJPEG writes on a stream of its own, into memory allocated on this one: memory freed here by the last
            # batch's kernels, still queued, must not be handed to it.
            self.side.synchronize()
            with torch.cuda.stream(self.side):
                images = self.augment.crops(batch)
                labels = labels.to(self.augment.device, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
        # A JPEG whose header reads but whose data does not decode is a bad sample too, counted with the others.
        undecoded = [keys[i].rpartition("#") for i in self.augment.last_failed]
        reason = "image does not decode (nvJPEG); replaced by another of its batch"
        self.stream.count_bad([{"url": url, "key": key, "reason": reason, "count": 1} for url, _, key in undecoded])
        state, events = self.stream.state(), list(self.stream.new_bad)
        self.stream.new_bad.clear()
        return images, labels, state, events, ready

    def __iter__(self) -> Prefetched:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, self._state, events, ready = self._ahead.popleft().result()
        self.new_bad.extend(events)
        self._ahead.append(self.pool.submit(self._load))
        if ready is not None:
            current = torch.cuda.current_stream(self.augment.device)
            current.wait_event(ready)
            for tensor in (images, labels):  # made on the side stream, used and freed on this one
                tensor.record_stream(current)
        return self.augment.randomly_augment(images), labels

    def state(self) -> dict:
        return self._state

    @property
    def epoch(self) -> int:
        return self._state["epoch"]

    @property
    def position(self) -> int:
        return self._state["position"]

    @property
    def read(self) -> int:
        return self._state["read"]

    @property
    def bad(self) -> int:
        return self._state["bad"]

    def close(self) -> None:
        for future in self._ahead:
            future.cancel()
        for future in self._ahead:
            with contextlib.suppress(Exception):  # the batches being made are not wanted any more
                future.result()
        self.pool.shutdown()
        self.stream.close()


def gpu_stream(
    plan: StreamPlan,
    augment: AugmentConfig,
    image_size: int,
    device: torch.device,
    *,
    state: dict | None = None,
    max_bad_fraction: float = 0.01,
) -> Prefetched:
    """The training stream of `data.decode: gpu`, as `mixer run` reads it: workers read the shards and draw each
    image's crop and flip, this process decodes and crops the batches on `device`, `Prefetched.AHEAD` ahead."""
    stream = TrainStream(plan, gpu_prepare(augment), collate=pack, state=state, max_bad_fraction=max_bad_fraction)
    return Prefetched(stream, GpuAugment(augment, image_size, device))
