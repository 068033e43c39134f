"""Writing WebDataset tar shards and their index.

A sample is three tar members sharing a key: `<key>.<jpg|png|webp>` (the encoded image, as is, or re-encoded to a
maximum side), `<key>.cls` (the class index as ASCII) and `<key>.json` (metadata). Next to the shards, `index.json`
lists every shard with its sample count, which readers use to size epochs without opening the tars.

`write_dataset_shards` is the scalable writer behind `mixer shards write`: sources (an image folder or a CSV/JSONL
manifest of paths or URLs) are planned into shards up front, shards are written by parallel processes, each appears
under its final name only when complete (a rerun skips finished ones), and images that do not decode are left out
and listed in `report.json`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipeline.data.index import ShardIndex, read_index, write_index

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# GNU headers with whole-second mtimes: one 512-byte header per member, where the default PAX format adds an
# extended header to each (float mtime) that readers then parse; a fixed mtime makes shards byte-reproducible.
TAR_OPTIONS = {"format": "GNU_FORMAT", "mtime": 0}


@dataclass
class Sample:
    key: str  # unique within the data set; no dots (WebDataset splits member names at the first dot)
    image: bytes  # encoded image file contents
    ext: str  # "jpg", "png" or "webp"
    label: int
    meta: dict = field(default_factory=dict)


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
    with wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_bytes, verbose=0, **TAR_OPTIONS) as sink:
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
    shards = [{"url": name, "num_samples": n, "bytes": (out / name).stat().st_size} for name, n in counts.items()]
    return read_index(write_index(out, shards, classes))


# --------------------------------------------------------------------------- the scalable writer

WRITER_DIR = ".writer"  # per-shard completion records, so a rerun skips finished shards
REPORT_NAME = "report.json"


@dataclass(frozen=True)
class Item:
    """One image to write: a local path or a URL (anything `webdataset.gopen`/fsspec opens), its label, metadata."""

    source: str
    label: int
    meta: dict = field(default_factory=dict)


def items_from_folder(folder: str | Path) -> tuple[list[str], list[Item]]:
    """An image folder with one sub-folder per class -> (class names, items in class order)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders")
    items = [
        Item(str(path), label, {"class": name, "source": str(path.relative_to(root))})
        for label, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    return classes, items


def items_from_manifest(manifest: str | Path) -> tuple[list[str], list[Item]]:
    """A CSV (with a header) or JSONL manifest: `path` or `url`, `label` (an integer or a class name) and any extra
    fields, kept as metadata. Relative paths are taken from the manifest's folder. Class names are sorted."""
    manifest = Path(manifest)
    if manifest.suffix.lower() == ".csv":
        with manifest.open(newline="") as f:
            rows = list(csv.DictReader(f))
    elif manifest.suffix.lower() in (".jsonl", ".ndjson"):
        rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    else:
        raise ValueError(f"{manifest}: a manifest is .csv or .jsonl")
    for n, row in enumerate(rows, start=1 if manifest.suffix.lower() == ".jsonl" else 2):
        if not ({"path", "url"} & row.keys()) or "label" not in row:
            raise ValueError(f"{manifest}:{n}: a row needs `path` (or `url`) and `label`; it has {sorted(row)}")
    labels = [str(row["label"]) for row in rows]
    numeric = all(label.lstrip("-").isdigit() for label in labels)
    classes = [] if numeric else sorted(set(labels))
    items = []
    for row, label in zip(rows, labels):
        source = str(row.get("path") or row["url"])
        if "path" in row and not Path(source).is_absolute():
            source = str(manifest.parent / source)
        meta = {k: v for k, v in row.items() if k not in ("path", "url", "label")}
        meta["source"] = source
        if classes:
            meta["class"] = label
        items.append(Item(source, int(label) if numeric else classes.index(label), meta))
    return classes, items


def plan_shards(items: list[Item], max_count: int, max_bytes: int) -> list[range]:
    """Consecutive item ranges, each at most `max_count` items and (for local files, by their size on disk)
    `max_bytes`. Fixed before writing, so a rerun plans the same shards."""
    plan, start, size = [], 0, 0
    for i, item in enumerate(items):
        path = Path(item.source)
        nbytes = path.stat().st_size if "://" not in item.source and path.exists() else 0
        if i > start and (i - start >= max_count or size + nbytes > max_bytes):
            plan.append(range(start, i))
            start, size = i, 0
        size += nbytes
    if start < len(items):
        plan.append(range(start, len(items)))
    return plan


def _read_source(source: str) -> bytes:
    if "://" in source or source.startswith("pipe:"):
        from pipeline.data.sources import open_shard  # the same opener (gopen / fsspec) the reader uses

        with open_shard(source) as stream:
            return stream.read()
    return Path(source).read_bytes()


def _encode(data: bytes, max_side: int | None, quality: int) -> tuple[bytes, str]:
    """Check the image decodes (with the reader's decoder); re-encode to JPEG if it exceeds `max_side`."""
    from pipeline.data.transforms import decode

    with Image.open(io.BytesIO(data)) as im:
        fmt = (im.format or "").lower()
        if max_side and max(im.size) > max_side:
            im.draft("RGB", (max_side, max_side))  # JPEG: decode at the smallest DCT scale still >= max_side
            im = im.convert("RGB")
            im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            out = io.BytesIO()
            im.save(out, "JPEG", quality=quality)
            return out.getvalue(), "jpg"
    decode(data)  # raises if torchvision cannot read it: better left out now than skipped at every epoch
    ext = {"jpeg": "jpg", "mpo": "jpg", "png": "png", "webp": "webp"}.get(fmt)
    if ext is None:
        raise ValueError(f"format {fmt or 'unknown'} is not one the reader takes (JPEG, PNG, WebP)")
    return data, ext


def _write_one_shard(task: tuple) -> dict:
    """Write one planned shard (in a worker process): `<name>.tar` appears only once complete."""
    out, name, first, items, max_side, quality = task
    out = Path(out)
    tmp = out / f"{name}.tmp"
    failed, count = [], 0
    with wds.TarWriter(str(tmp), **TAR_OPTIONS) as sink:
        for offset, item in enumerate(items):
            try:
                data, ext = _encode(_read_source(item.source), max_side, quality)
            except Exception as err:  # an unreadable file of any kind is reported, never fatal
                failed.append({"source": item.source, "error": f"{type(err).__name__}: {err}"})
                continue
            sink.write(
                {
                    "__key__": f"{first + offset:09d}",
                    ext: data,
                    "cls": str(item.label).encode(),
                    "json": json.dumps(item.meta).encode(),
                }
            )
            count += 1
    tmp.replace(out / name)
    record = {"url": name, "num_samples": count, "bytes": (out / name).stat().st_size, "failed": failed}
    (out / WRITER_DIR / f"{name}.json").write_text(json.dumps(record))
    return record


def write_dataset_shards(
    items: list[Item],
    out_dir: str | Path,
    *,
    classes: list[str],
    workers: int = 4,
    max_count: int = 10_000,
    max_bytes: int = 256 * 1024**2,
    max_side: int | None = None,
    quality: int = 90,
    prefix: str = "shard",
    progress: bool = True,
) -> tuple[ShardIndex, dict]:
    """Write `items` as shards with `workers` processes; returns the index and the report (also `report.json`).

    Resumable: shards already complete from an earlier run with the same plan are kept."""
    out = Path(out_dir)
    (out / WRITER_DIR).mkdir(parents=True, exist_ok=True)
    plan = plan_shards(items, max_count, max_bytes)
    fingerprint = hashlib.sha1(
        json.dumps([[items[r.start].source, len(r)] for r in plan] + [max_side, quality]).encode()
    ).hexdigest()
    plan_file = out / WRITER_DIR / "plan.json"
    if plan_file.exists() and json.loads(plan_file.read_text())["fingerprint"] != fingerprint:
        raise ValueError(f"{out} holds shards of a different plan (other sources or limits); write to a new folder")
    plan_file.write_text(json.dumps({"fingerprint": fingerprint, "shards": len(plan)}))
    names = [f"{prefix}-{i:06d}.tar" for i in range(len(plan))]
    records: dict[str, dict] = {}
    for name in names:
        done = out / WRITER_DIR / f"{name}.json"
        if done.exists() and (out / name).exists():
            records[name] = json.loads(done.read_text())
    todo = [
        (str(out), name, r.start, [items[i] for i in r], max_side, quality)
        for name, r in zip(names, plan)
        if name not in records
    ]
    skipped = sum(len(r) for name, r in zip(names, plan) if name in records)
    bar = tqdm(total=len(items), initial=skipped, unit="img", desc=f"writing {out}", disable=not progress)
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for record in pool.map(_write_one_shard, todo) if todo else ():
            records[record["url"]] = record
            bar.update(record["num_samples"] + len(record["failed"]))
    bar.close()
    shards = [records[name] for name in names]
    index = read_index(write_index(out, [{k: r[k] for k in ("url", "num_samples", "bytes")} for r in shards], classes))
    failed = [f for r in shards for f in r["failed"]]
    report = {
        "items": len(items),
        "written": index.num_samples,
        "failed": failed,
        "shards": len(shards),
        "resumed_shards": len(names) - len(todo),
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=1))
    return index, report
