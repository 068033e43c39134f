"""Where shards come from and how they are opened: local directories and brace patterns, `pipe:` commands, and
object stores (any fsspec URL: s3://, gs://, az://, hf://, ...).

Every training source has an index (`index.json`, format `mixer-shards/1`) with the sample count of each shard: the
reader sizes epochs, balances ranks and resumes by position from it without opening a tar. Shards written by other
tools get one from `mixer shards index`, or automatically before launch when they are local.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import webdataset as wds
from webdataset import tariterators

from pipeline.config import DatasetConfig, SourceConfig
from pipeline.data.index import INDEX_NAME, ShardIndex, is_remote, read_index, write_index

log = logging.getLogger(__name__)
wds_gopen = importlib.import_module("webdataset.gopen")  # the module (the package exports a function of that name)


def is_pattern(url: str) -> bool:
    """A shard list (`.../train-{000000..000099}.tar`, `pipe:...`, several joined by `::`) rather than a folder."""
    return url.startswith("pipe:") or "{" in url or "::" in url or url.endswith((".tar", ".tar.gz", ".tgz"))


def open_shard(url: str, retries: int = 3, backoff_s: float = 1.0):
    """A readable binary stream of one shard, with retries (object stores and NFS fail transiently).

    webdataset's `gopen` serves local paths, `pipe:` and the schemes it knows; fsspec serves the rest.
    """
    for attempt in range(retries + 1):
        try:
            scheme = urlparse(url).scheme
            if scheme in wds_gopen.gopen_schemes or not is_remote(url):
                return wds_gopen.gopen(url, "rb")
            return fsspec.open(url, "rb").open()
        except Exception as err:
            if attempt == retries:
                raise OSError(f"cannot open shard {url} after {retries + 1} attempts: {err}") from err
            log.warning("opening %s failed (%s); retrying", url, err)
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def iter_shard(url: str, stream, on_error) -> Iterator[dict]:
    """The samples of one opened shard, grouped by key as webdataset groups them (`__key__`, `__url__`, one entry
    per extension). Unreadable members and a truncated tail go to `on_error(exception)` and end nothing else."""

    def handler(err: Exception) -> bool:
        on_error(err)
        return True

    members = tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
    yield from tariterators.group_by_keys(members, handler=handler)


def count_samples(url: str, retries: int = 3) -> int:
    """Samples in one shard. Local tars are listed header by header (no image bytes read); others are streamed."""
    if not is_remote(url):
        try:
            with tarfile.open(url, "r:*") as tar:
                keys = [tariterators.base_plus_ext(m.name)[0] for m in tar.getmembers() if m.isreg()]
        except (tarfile.TarError, EOFError) as err:  # an empty, truncated or foreign file
            raise ValueError(f"{url} is not a readable tar shard ({err or type(err).__name__})") from err
        # group_by_keys starts a new sample whenever the key changes between consecutive members
        return sum(1 for i, key in enumerate(keys) if key is not None and (i == 0 or keys[i - 1] != key))
    stream = open_shard(url, retries)
    try:
        return sum(1 for _ in iter_shard(url, stream, lambda err: log.warning("%s: %s", url, err)))
    finally:
        stream.close()


def expand(pattern: str) -> list[str]:
    """Brace patterns and `::`-joined lists -> shard URLs (webdataset's own expansion)."""
    return wds.shardlists.expand_urls(pattern)


def index_shards(urls: list[str], out: str | Path, classes: list[str] | tuple[str, ...] = (), progress=None) -> Path:
    """Count the samples of existing shards (written by any tool) and write an index for them.

    Shards in the index's own folder are stored by name, so the folder can move; others by full URL.
    """
    out = Path(out)
    entries = []
    for url in urls:
        count = count_samples(url)
        local = not is_remote(url) and Path(url).resolve().parent == out.parent.resolve()
        entries.append({"url": Path(url).name if local else url, "num_samples": count})
        if progress is not None:
            progress(url, count)
    return write_index(out, entries, classes)


def index_location(url: str, index: str | None, cache_dir: Path) -> str:
    """Where a source's index is: given, inside its folder/prefix, or (for a shard pattern) written under
    `cache_dir` by `ensure_index` before launch."""
    if index:
        return index
    if not is_pattern(url):
        return f"{url.rstrip('/')}/{INDEX_NAME}"
    digest = hashlib.sha1(url.encode()).hexdigest()[:12]
    return str(cache_dir / f"index-{digest}.json")


def ensure_index(url: str, index: str | None, cache_dir: Path) -> str:
    """Make sure the source has an index; local shards without one are counted once and indexed (logged)."""
    location = index_location(url, index, cache_dir)
    if is_remote(location):
        return location
    if Path(location).exists():
        return location
    if index:
        raise FileNotFoundError(f"index {index} does not exist; write it with `mixer shards index`")
    if is_pattern(url):
        urls = expand(url)
    else:
        urls = sorted(str(p) for p in Path(url).glob("*.tar"))
    if not urls:
        raise FileNotFoundError(f"{url}: no shards and no {INDEX_NAME}")
    if any(is_remote(u) for u in urls):
        raise ValueError(
            f"{url}: remote shards need an index; write one with `mixer shards index '{url}' --out FILE` and set "
            "the source's `index`"
        )
    log.warning("indexing %d shards of %s (once; they have no index.json)", len(urls), url)
    return str(index_shards(urls, location))


def source_configs(dataset: DatasetConfig) -> list[SourceConfig]:
    """The dataset's training sources; without any, its `path/train_split` folder."""
    return dataset.sources or [SourceConfig(url=str(Path(dataset.path) / dataset.train_split))]


def training_sources(dataset: DatasetConfig, cache_dir: Path) -> tuple[ShardIndex, ...]:
    """The dataset's training sources read from their indexes (every rank calls this after `prepare_sources`)."""
    return tuple(
        dataclasses.replace(
            read_index(index_location(s.url, s.index, cache_dir), expand(s.url) if is_pattern(s.url) else ()),
            name=s.url,
            weight=s.weight,
        )
        for s in source_configs(dataset)
    )


def prepare_sources(dataset: DatasetConfig, cache_dir: Path) -> tuple[ShardIndex, ...]:
    """Before launch: index shards that have none, then read every source (a missing one fails here, not in a rank)."""
    for s in source_configs(dataset):
        ensure_index(s.url, s.index, cache_dir)
    return training_sources(dataset, cache_dir)
