"""Procedural image-classification data for the demo and the tests (no downloads).

Each image is one coloured shape at a random place, size, rotation and colour, on a noisy gradient background
with distractor lines and dots. "shapes" (8 classes) is the pre-training task; "novel-shapes" (4 classes the
pre-training never saw) is the fine-tuning task, so fine-tuning has to transfer, not memorise. "photos" are
ImageNet-sized (500x375) photo-like JPEGs for throughput measurements: realistic decode cost, nothing to learn.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.index import ShardIndex
from pipeline.data.shards import Sample, write_shards

SUPERSAMPLE = 4  # draw large, then downsample: smooth edges like a photographed object

Point = tuple[float, float]


def _polygon(points: list[Point], cx: float, cy: float, r: float, angle: float) -> list[Point]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]


def _regular(n: int, phase: float = 0.0) -> list[Point]:
    return [(math.cos(phase + 2 * math.pi * k / n), math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star(n: int = 5, inner: float = 0.45) -> list[Point]:
    return [
        (
            (1 if k % 2 == 0 else inner) * math.cos(-math.pi / 2 + math.pi * k / n),
            (1 if k % 2 == 0 else inner) * math.sin(-math.pi / 2 + math.pi * k / n),
        )
        for k in range(2 * n)
    ]


_PLUS = [
    (-0.3, -1),
    (0.3, -1),
    (0.3, -0.3),
    (1, -0.3),
    (1, 0.3),
    (0.3, 0.3),
    (0.3, 1),
    (-0.3, 1),
    (-0.3, 0.3),
    (-1, 0.3),
    (-1, -0.3),
    (-0.3, -0.3),
]
_ARROW = [(-1, -0.3), (0.1, -0.3), (0.1, -0.8), (1, 0), (0.1, 0.8), (0.1, 0.3), (-1, 0.3)]
_DIAMOND = [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)]
_SQUARE = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]

Drawer = Callable[[ImageDraw.ImageDraw, float, float, float, float, tuple], None]


def _fill(points: list[Point]) -> Drawer:
    def draw(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float, color: tuple) -> None:
        d.polygon(_polygon(points, cx, cy, r, angle), fill=color)

    return draw


def _circle(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float, color: tuple) -> None:
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)


def _ring(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float, color: tuple) -> None:
    d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=color, width=max(1, int(r * 0.35)))


def _half_disc(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float, color: tuple) -> None:
    start = math.degrees(angle)
    d.pieslice((cx - r, cy - r, cx + r, cy + r), start, start + 180, fill=color)


def _frame(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float, color: tuple) -> None:
    outer = _polygon(_SQUARE, cx, cy, r, angle)
    d.polygon(outer, outline=color, width=max(1, int(r * 0.3)))


SHAPE_SETS: dict[str, dict[str, Drawer]] = {
    "shapes": {
        "circle": _circle,
        "square": _fill(_SQUARE),
        "triangle": _fill(_regular(3, -math.pi / 2)),
        "hexagon": _fill(_regular(6)),
        "star": _fill(_star()),
        "plus": _fill(_PLUS),
        "ring": _ring,
        "half-disc": _half_disc,
    },
    "novel-shapes": {
        "diamond": _fill(_DIAMOND),
        "x-cross": _fill(_polygon(_PLUS, 0, 0, 1, math.pi / 4)),
        "arrow": _fill(_ARROW),
        "frame": _frame,
    },
}


def render(kind: str, label: int, size: int, rng: random.Random) -> Image.Image:
    """One image of class `label` of the shape set `kind`."""
    big = size * SUPERSAMPLE
    bg0 = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    bg1 = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    t = np.linspace(0, 1, big, dtype=np.float32)[:, None, None]
    background = np.broadcast_to(bg0 * (1 - t) + bg1 * t, (big, big, 3))
    image = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):  # distractor lines
        xy = [rng.uniform(0, big) for _ in range(4)]
        draw.line(xy, fill=tuple(rng.randint(0, 255) for _ in range(3)), width=rng.randint(1, SUPERSAMPLE))
    r = rng.uniform(0.24, 0.4) * big
    cx, cy = rng.uniform(r, big - r), rng.uniform(r, big - r)
    # A colour far from the background's mean, so the shape is visible.
    mean = (bg0 + bg1) / 2
    color = tuple(int(255 - m + rng.uniform(-40, 40)) % 256 for m in mean)
    drawer = list(SHAPE_SETS[kind].values())[label]
    drawer(draw, cx, cy, r, rng.uniform(-0.25, 0.25), color)
    for _ in range(rng.randint(0, 3)):  # distractor dots
        x, y, s = rng.uniform(0, big), rng.uniform(0, big), rng.uniform(1, 2) * SUPERSAMPLE
        draw.ellipse((x - s, y - s, x + s, y + s), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    small = np.asarray(image.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 12, small.shape)
    return Image.fromarray(np.clip(small + noise, 0, 255).astype(np.uint8))


def generate(kind: str, count: int, size: int, seed: int) -> Iterator[Sample]:
    """`count` JPEG samples with balanced classes in random order, reproducible from `seed`."""
    names = list(SHAPE_SETS[kind])
    rng = random.Random(f"{kind}-{seed}")
    for i in range(count):
        label = rng.randrange(len(names))
        buf = io.BytesIO()
        render(kind, label, size, rng).save(buf, format="JPEG", quality=90)
        yield Sample(
            key=f"{kind}-{seed}-{i:07d}",
            image=buf.getvalue(),
            ext="jpg",
            label=label,
            meta={"class": names[label], "generator": kind},
        )


def write_dataset(
    kind: str,
    out_dir: str | Path,
    *,
    samples: int,
    size: int,
    seed: int,
    max_count: int | None = None,
    desc: str | None = None,
) -> ShardIndex:
    """Render and write one split as shards, with the same writer users use for their folders.

    By default 8 shards, so that split mode can deal them to up to 8 ranks x workers."""
    samples_iter = generate(kind, samples, size, seed)
    max_count = max_count or max(1, math.ceil(samples / 8))
    classes = list(SHAPE_SETS[kind])
    return write_shards(samples_iter, out_dir, classes=classes, max_count=max_count, total=samples, desc=desc)


PHOTO_CLASSES = 1000


def photo_like(rng: np.random.Generator, height: int = 375, width: int = 500) -> bytes:
    """A JPEG with a photo's mix of smooth regions, edges and texture (so its entropy, and decode cost, are
    realistic), at quality 90."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(5, 60), rng.uniform(5, 60), rng.uniform(0, 6.3)
        base = 110 + 60 * np.sin(x / fx + phase) * np.cos(y / fy)
        channels.append(base + rng.normal(0, 18, (height, width)))
    image = np.stack(channels, -1)
    for _ in range(6):  # a few hard-edged blobs
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(15, 90)
        image[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    out = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def make_photo_shards(
    out: str | Path, images: int, per_shard: int = 250, seed: int = 0, desc: str = "generating photo-like shards"
) -> Path:
    """`images` generated 500x375 JPEGs in shards of `per_shard`, labels 0..999 in turn (reused if already there):
    ImageNet-sized inputs for throughput measurements; there is nothing in them to learn."""
    out = Path(out)
    if (out / "index.json").exists():
        return out
    rng = np.random.default_rng(seed)
    distinct = [photo_like(rng) for _ in range(min(images, 200))]  # encoding is slow; reuse 200 distinct photos
    samples = (Sample(f"{i:08d}", distinct[i % len(distinct)], "jpg", i % PHOTO_CLASSES) for i in range(images))
    write_shards(samples, out, classes=[], max_count=per_shard, total=images, desc=desc)
    return out
