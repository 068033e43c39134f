"""The shard index (`index.json`, format `mixer-shards/1`): its one type, its one reader and its one writer.

An index lists a split's or a source's shards with their sample counts (and sizes, where the writer knew them),
which readers use to size epochs without opening the tars, and the class names. Shards are named relative to the
index where they sit beside it, so the folder can move.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import fsspec

INDEX_NAME = "index.json"
INDEX_FORMAT = "mixer-shards/1"


class DataError(RuntimeError):
    """The data cannot feed the run: a source without samples, or more bad samples than allowed."""


@dataclass(frozen=True)
class ShardIndex:
    """Shards (resolved URLs or paths) with their sample counts; `weight` sets its share when several are mixed."""

    name: str  # where it was read from, or a label
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    weight: float = 1.0
    classes: tuple[str, ...] = ()

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def head(self, num_samples: int) -> ShardIndex:
        """The leading shards that hold at least `num_samples` samples (all of them if fewer)."""
        total, n = 0, 0
        while n < len(self.counts) and total < num_samples:
            total += self.counts[n]
            n += 1
        return ShardIndex(self.name, self.urls[:n], self.counts[:n], self.weight, self.classes)


def is_remote(url: str) -> bool:
    """Anything with a scheme (pipe:, s3://, https://, ...) other than file://."""
    scheme = urlparse(url).scheme
    return scheme not in ("", "file") and not (len(scheme) == 1 and url[1:3] in (":\\", ":/"))


def write_index(out: str | Path, shards: list[dict], classes: list[str] | tuple[str, ...] = ()) -> Path:
    """`out` (a file, or a folder to hold `index.json`) listing `shards` (`url`, `num_samples`, optional `bytes`),
    written atomically: a reader never sees half an index."""
    out = Path(out)
    if out.is_dir():
        out = out / INDEX_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    index = {
        "format": INDEX_FORMAT,
        "num_samples": sum(int(s["num_samples"]) for s in shards),
        "classes": list(classes),
        "shards": shards,
    }
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(out)
    return out


def read_index(location: str | Path, declared: tuple[str, ...] | list[str] = ()) -> ShardIndex:
    """An index (a local file or folder, or a URL) -> its shards, resolved against the index's own folder or URL
    prefix; a clear error if it is missing or not ours.

    An index is data, not a command: its entries may name files (relative to the index, local paths beside a local
    index, or URLs of the index's own scheme), and other schemes, `pipe:` above all (webdataset runs it through a
    shell), only where the config's source spelled that very URL (`declared`: the source's expanded pattern)."""
    location = str(location)
    if not is_remote(location) and Path(location).is_dir():
        location = str(Path(location) / INDEX_NAME)
    try:
        if is_remote(location):
            with fsspec.open(location, "rt") as f:
                data = json.load(f)
        else:
            data = json.loads(Path(location).read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"no shard index at {location}: write shards with `mixer shards write`, or index existing ones with "
            f"`mixer shards index`"
        ) from err
    if data.get("format") != INDEX_FORMAT:
        raise ValueError(f"{location}: format is {data.get('format')!r}, expected {INDEX_FORMAT!r}")
    base = location.rsplit("/", 1)[0] if is_remote(location) else str(Path(location).resolve().parent)
    own_scheme = urlparse(location).scheme if is_remote(location) else ""
    urls = []
    for entry in data["shards"]:
        url = entry["url"]
        scheme = urlparse(url).scheme if is_remote(url) else ""
        if url not in declared and (scheme != own_scheme if scheme else own_scheme and Path(url).is_absolute()):
            raise DataError(
                f"{location}: shard entry {url!r} is not a file of this data set; an index names its shards "
                "relative to itself or by its own scheme. A pipe: command or another scheme belongs in the "
                "config (the source's url), which then needs this index to list exactly those URLs"
            )
        relative = not is_remote(url) and not Path(url).is_absolute()
        urls.append(f"{base}/{url}" if relative else url)
    return ShardIndex(
        name=location,
        urls=tuple(urls),
        counts=tuple(int(e["num_samples"]) for e in data["shards"]),
        classes=tuple(data.get("classes", ())),
    )
