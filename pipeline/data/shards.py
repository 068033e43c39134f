"""Writing WebDataset tar shards and their index.

A sample is three tar members sharing a key: `<key>.<jpg|png|webp>` (the encoded image, as is),
`<key>.cls` (the class index as ASCII) and `<key>.json` (metadata). Next to the shards, `index.json` lists
every shard with its sample count, which readers use to size epochs without opening the tars.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

INDEX_NAME = "index.json"
INDEX_FORMAT = "mixer-shards/1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class Sample:
    key: str  # unique within the data set; no dots (WebDataset splits member names at the first dot)
    image: bytes  # encoded image file contents
    ext: str  # "jpg", "png" or "webp"
    label: int
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ShardIndex:
    """What `index.json` says of one split: shard paths (absolute) and sample counts."""

    root: Path
    shards: tuple[str, ...]
    counts: tuple[int, ...]
    classes: tuple[str, ...]

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def head(self, num_samples: int) -> ShardIndex:
        """The leading shards that hold at least `num_samples` samples (all of them if fewer)."""
        total, n = 0, 0
        while n < len(self.counts) and total < num_samples:
            total += self.counts[n]
            n += 1
        return ShardIndex(self.root, self.shards[:n], self.counts[:n], self.classes)

    @property
    def urls(self) -> list[str]:
        return [str(self.root / name) for name in self.shards]


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | Path,
    *,
    classes: list[str],
    max_bytes: int = 256 * 1024**2,
    max_count: int = 100_000,
    total: int | None = None,
    prefix: str = "shard",
    progress: bool = True,
    desc: str | None = None,
) -> ShardIndex:
    """Write samples into `out_dir/<prefix>-NNNNNN.tar`, each under `max_bytes` and `max_count`, plus the index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    bar = tqdm(total=total, unit="img", desc=desc or f"writing {out}", disable=not progress, leave=False)
    pattern = str(out / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_bytes, verbose=0) as sink:
        for sample in samples:
            if "." in sample.key:
                raise ValueError(f"sample key {sample.key!r} contains a dot")
            sink.write(
                {
                    "__key__": sample.key,
                    sample.ext: sample.image,
                    "cls": str(sample.label).encode(),
                    "json": json.dumps(sample.meta).encode(),
                }
            )
            name = Path(sink.fname).name
            counts[name] = counts.get(name, 0) + 1
            bar.update(1)
    bar.close()
    index = {
        "format": INDEX_FORMAT,
        "num_samples": sum(counts.values()),
        "classes": list(classes),
        "shards": [{"url": name, "num_samples": n, "bytes": (out / name).stat().st_size} for name, n in counts.items()],
    }
    (out / INDEX_NAME).write_text(json.dumps(index, indent=1))
    return read_index(out)


def read_index(split_dir: str | Path) -> ShardIndex:
    """Load `split_dir/index.json`; a clear error if it is missing or not ours."""
    root = Path(split_dir).resolve()
    path = root / INDEX_NAME
    if not path.exists():
        raise FileNotFoundError(f"no shard index at {path}: write the shards with `mixer shards write`")
    data = json.loads(path.read_text())
    if data.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: format is {data.get('format')!r}, expected {INDEX_FORMAT!r}")
    shards = data["shards"]
    return ShardIndex(
        root=root,
        shards=tuple(s["url"] for s in shards),
        counts=tuple(int(s["num_samples"]) for s in shards),
        classes=tuple(data.get("classes", ())),
    )


def samples_from_folder(folder: str | Path) -> tuple[list[str], list[Path], Iterator[Sample]]:
    """An image folder with one sub-folder per class -> (class names, files, samples in class order)."""
    root = Path(folder)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders")
    files = [
        (label, path)
        for label, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_EXTENSIONS
    ]

    def generate() -> Iterator[Sample]:
        for i, (label, path) in enumerate(files):
            ext = path.suffix.lower().lstrip(".")
            yield Sample(
                key=f"{i:08d}",
                image=path.read_bytes(),
                ext="jpg" if ext == "jpeg" else ext,
                label=label,
                meta={"class": classes[label], "source": str(path.relative_to(root))},
            )

    return classes, [p for _, p in files], generate()
