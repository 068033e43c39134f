"""Streaming shards into batches: a training stream that resumes exactly, and an evaluation pass over every sample.

Training (`TrainStream`), per rank:

- An epoch is `samples_per_epoch` samples (default: the sources' total, from their indexes). Every rank runs exactly
  `batches_per_epoch = samples_per_epoch // (world_size * micro_batch)` micro-batches of it, whatever the shard sizes,
  bad samples or number of loader workers, so no rank ever waits in a collective for another that ran dry. Batch `p` of
  an epoch is made by loader worker `p % W` (W = max(1, num_workers)); each worker makes its share and goes straight
  on to its share of the next epoch.
- Each (rank, worker) slot reads a sequence of shards per source:
  `split`: epoch e shuffles the shard list with seed (seed, source, e) and deals it to the slots, each shard to the
  slot with the fewest samples so far; a slot that needs more samples than its share cycles over it again.
  `resampled`: shards drawn with replacement, seeded by (seed, source, e, rank, worker).
- Samples along a slot's sequence are numbered by the index counts, and shuffled in blocks of `shuffle_buffer`
  consecutive positions, each block permuted by a seed of its own. A worker's place is therefore (block, taken) per
  source: resuming opens the shard holding the block's first sample, skips to it and continues exactly where an
  uninterrupted run would, without reading the shards before. Several sources are mixed by drawing each sample's
  source by weight from a seeded generator; the number of draws is part of the place.
- Augmentation randomness is seeded per batch from (seed, epoch, rank, worker, batch): replays are identical.
- Bad data (a shard that will not open after retries, an unreadable member, a shard shorter than its index, an image
  that does not decode, a missing label) is skipped and reported with its shard and key; when more than
  `max_bad_fraction` of the samples read are bad, the run stops with `DataError` (judged once 1,000 samples are
  read or 20 are bad, so that a few bad samples early in a long run do not stop it, and a short run is judged too).

`TrainStream.state()` is the position to checkpoint. Loaded on the same layout (world size, workers, batch, seed,
sources), it continues exactly. On another layout it is remapped by global sample count: the run continues at the
epoch and batch that a run with the new layout would have reached after the same number of samples, each worker at
the place it would have had (exact when no sample was skipped before; otherwise within the skipped count).

Evaluation (`eval_batches`) reads every held-out sample once, shards dealt round-robin over ranks, padded so every
rank runs the same number of batches.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import json
import logging
import math
import signal
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import webdataset as wds

from pipeline.config import ExperimentConfig, StageConfig
from pipeline.data.index import DataError, ShardIndex
from pipeline.data.shards import IMAGE_EXTENSIONS
from pipeline.data.sources import iter_shard, open_shard
from pipeline.data.transforms import decode

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, 3, H, W) uint8, labels (B,) int64
IMAGE_KEYS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
LABEL_KEYS = ("label", "cls", "class")
CHECK_BAD_AFTER = 1000  # samples read before the bad-data fraction is enforced, ...
CHECK_BAD_FROM = 20  # ... or bad samples seen, whichever comes first
STATE_VERSION = 1


class BadSample(ValueError):
    """A sample that cannot be used; the message says why."""


STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1}


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 to their rank, which saves before exiting (and takes them along):
    launchers signal a rank's whole process group, and a worker dying first would abort the save. A signal that
    came while the worker started, held back by `started_without_stop_signals`, is dropped here."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def started_without_stop_signals(loader: torch.utils.data.DataLoader) -> Iterator:
    """`iter(loader)`, its worker processes started with the stop signals blocked. Before `_ignore_stop_signals`
    runs in a worker, torch's own handler is in place there, and a SIGTERM then ends the worker (and the rank's
    evaluation or training with it). The rank gets a signal that came meanwhile once they are unblocked here."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def seed_of(*parts: int) -> int:
    """A 32-bit seed from a tuple of integers (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# --------------------------------------------------------------------------- samples


def _label(sample: dict, classes: tuple[str, ...]) -> int:
    """`.cls` (an integer), else `.json` (`label`/`cls`/`class`: integer or class name), else `.txt`."""
    if "cls" in sample:
        return int(sample["cls"].decode().strip())
    candidates = []
    if "json" in sample:
        meta = json.loads(sample["json"])
        candidates = [meta[k] for k in LABEL_KEYS if isinstance(meta, dict) and k in meta]
    if "txt" in sample:
        candidates.append(sample["txt"].decode().strip())
    for value in candidates:
        if isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit()):
            return int(value)
        if isinstance(value, str) and value in classes:
            return classes.index(value)
    raise BadSample("no label (.cls, .json label/cls/class or .txt)")


def check_label(label: int, num_classes: int | None) -> int:
    """`label`, or `BadSample` when it is outside the data set's classes (the loss would fail on it mid-run)."""
    if num_classes is not None and not 0 <= label < num_classes:
        raise BadSample(f"label {label} is outside 0..{num_classes - 1} (the data set's num_classes is {num_classes})")
    return label


def image_and_label(sample: dict, classes: tuple[str, ...] = ()) -> tuple[bytes, int]:
    """The encoded image and the integer label of a webdataset sample, or `BadSample`."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise BadSample(f"no image ({', '.join('.' + k for k in IMAGE_KEYS)})")
    try:
        return sample[key], _label(sample, classes)
    except BadSample:
        raise
    except (ValueError, UnicodeDecodeError) as err:
        raise BadSample(f"unreadable label: {err}") from err


class CpuPrepare:
    """Decode on the CPU and augment: sample -> ((3, H, W) uint8, label). A class so spawned workers can pickle it."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, sample: dict, classes: tuple[str, ...]) -> tuple[torch.Tensor, int]:
        data, label = image_and_label(sample, classes)
        try:
            image = decode(data)
        except RuntimeError as err:
            raise BadSample(f"image does not decode: {err}") from err
        return self.transform(image), label


cpu_prepare = CpuPrepare


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class StreamPlan:
    """Everything that fixes one rank's training sample sequence."""

    sources: tuple[ShardIndex, ...]
    mode: str  # "split" or "resampled"
    rank: int
    world_size: int
    num_workers: int
    micro_batch: int
    seed: int
    block: int  # shuffle block, in samples
    samples_per_epoch: int
    open_retries: int = 3
    num_classes: int | None = None  # labels outside 0..num_classes-1 are bad samples

    @property
    def slots(self) -> int:
        """Sample streams per rank: one per loader worker (one when the rank loads in-process)."""
        return max(1, self.num_workers)

    @property
    def batches_per_epoch(self) -> int:
        return self.samples_per_epoch // (self.world_size * self.micro_batch)

    def quota(self, worker: int) -> int:
        """Batches worker `worker` makes per epoch: positions p with p % slots == worker."""
        return len(range(worker, self.batches_per_epoch, self.slots))

    def layout(self) -> dict:
        """What must be equal for a saved position to continue exactly."""
        return {
            "mode": self.mode,
            "world_size": self.world_size,
            "slots": self.slots,
            "micro_batch": self.micro_batch,
            "seed": self.seed,
            "block": self.block,
            "samples_per_epoch": self.samples_per_epoch,
            "sources": [[len(s.urls), s.num_samples, s.weight] for s in self.sources],
        }

    def check(self) -> None:
        """Refuse what would hang or starve, before any batch is made."""
        if self.batches_per_epoch < 1:
            raise DataError(
                f"an epoch of {self.samples_per_epoch} samples is less than one batch of {self.micro_batch} on each "
                f"of {self.world_size} ranks"
            )
        for source in self.sources:
            if source.num_samples == 0:
                raise DataError(f"source {source.name} holds no samples")
            if self.mode == "split" and len(source.urls) < self.world_size * self.slots:
                raise DataError(
                    f"split mode: source {source.name} has {len(source.urls)} shards, fewer than ranks x workers = "
                    f"{self.world_size} x {self.slots}; write more, smaller shards, use fewer workers, or set "
                    "data.mode=resampled"
                )

    def sequence(self, source: int, epoch: int, worker: int) -> ShardSequence:
        """The shards slot (rank, worker) reads from `source` in `epoch`, in order, endless."""
        src = self.sources[source]
        if self.mode == "resampled":
            rng = np.random.default_rng([self.seed, source, epoch, self.rank, worker, 2])
            return ShardSequence(src, lambda i: int(rng.integers(len(src.urls))))
        shares = split_shares(src.counts, self.world_size * self.slots, seed_of(self.seed, source, epoch, 1))
        share = shares[self.rank * self.slots + worker]
        if sum(src.counts[i] for i in share) == 0:
            raise DataError(f"source {src.name}: the shards dealt to rank {self.rank} worker {worker} are all empty")
        return ShardSequence(src, lambda i: share[i % len(share)])


def stream_plan(
    cfg: ExperimentConfig, stage: StageConfig, rank: int, world_size: int, sources: tuple[ShardIndex, ...]
) -> StreamPlan:
    """The plan of one training stage on one rank; each stage draws its own sample order."""
    data = cfg.data
    return StreamPlan(
        sources=sources,
        mode=data.mode,
        rank=rank,
        world_size=world_size,
        num_workers=data.num_workers,
        micro_batch=stage.micro_batch,
        seed=seed_of(cfg.seed, zlib.crc32(stage.name.encode())),
        block=data.shuffle_buffer,
        samples_per_epoch=data.samples_per_epoch or sum(s.num_samples for s in sources),
        open_retries=data.open_retries,
        num_classes=cfg.datasets[stage.dataset].num_classes,
    )


def split_shares(counts: tuple[int, ...], num_slots: int, seed: int) -> list[list[int]]:
    """Shard indices shuffled by `seed`, each dealt to the slot holding the fewest samples so far."""
    order = np.random.default_rng(seed).permutation(len(counts))
    heap = [(0, slot) for slot in range(num_slots)]
    shares: list[list[int]] = [[] for _ in range(num_slots)]
    for i in order:
        total, slot = heapq.heappop(heap)
        shares[slot].append(int(i))
        heapq.heappush(heap, (total + counts[i], slot))
    return shares


class ShardSequence:
    """An endless sequence of a source's shards; sample positions along it come from the index counts."""

    def __init__(self, source: ShardIndex, pick: Callable[[int], int]) -> None:
        self.source = source
        self._pick = pick  # i-th shard of the sequence (called for i = 0, 1, 2, ... in order)
        self.shards: list[int] = []
        self.starts: list[int] = []

    def _end(self) -> int:
        return self.starts[-1] + self.source.counts[self.shards[-1]] if self.shards else 0

    def locate(self, position: int) -> tuple[int, int]:
        """(i, offset): the sample at `position` is the offset-th of the i-th shard of the sequence."""
        while self._end() <= position:
            start = self._end()
            self.shards.append(self._pick(len(self.shards)))
            self.starts.append(start)
        i = bisect.bisect_right(self.starts, position) - 1
        return i, position - self.starts[i]

    def shard(self, i: int) -> tuple[str, int, int]:
        """(url, first position, sample count) of the i-th shard; `locate` must have reached it."""
        while len(self.shards) <= i:
            self.locate(self._end())
        s = self.shards[i]
        return self.source.urls[s], self.starts[i], self.source.counts[s]


# --------------------------------------------------------------------------- one slot's reading


class SourceReader:
    """One source's samples for one slot, block-shuffled, from a place (block, taken)."""

    def __init__(self, seq: ShardSequence, block: int, seed: int, place: list[int], retries: int, report) -> None:
        self.seq, self.block, self.seed, self.retries, self.report = seq, block, seed, retries, report
        self.block_no, self.taken = place
        self.items: list[dict] | None = None
        self._stream: Iterator[tuple[int, dict]] | None = None
        self._next_pos = -1
        self._pending: tuple[int, dict] | None = None

    def place(self) -> list[int]:
        return [self.block_no, self.taken]

    def next(self) -> dict:
        empty_run = 0
        while self.items is None or self.taken >= len(self.items):
            if self.items is not None:
                self.block_no, self.taken = self.block_no + 1, 0
            self.items = self._load(self.block_no)
            empty_run = 0 if self.items else empty_run + 1
            if empty_run * self.block > 2 * self.seq.source.num_samples + self.block:
                raise DataError(f"source {self.seq.source.name}: no readable sample in a whole pass over its shards")
        item = self.items[self.taken]
        self.taken += 1
        return item

    def _load(self, block_no: int) -> list[dict]:
        lo, hi = block_no * self.block, (block_no + 1) * self.block
        if self._stream is None or self._next_pos != lo:
            self._stream, self._pending = self._positions(lo), None
        items = []
        while True:
            if self._pending is None:
                self._pending = next(self._stream)
            pos, sample = self._pending
            if pos >= hi:
                break  # kept for the next block; a shard marker past the block is not opened yet
            if sample is not None:
                items.append(sample)
            self._pending = None
        self._next_pos = hi
        order = np.random.default_rng([self.seed, block_no]).permutation(len(items))
        return [items[i] for i in order]

    def _positions(self, start: int) -> Iterator[tuple[int, dict]]:
        """(position, sample) from `start` on, opening each shard once and skipping to the first wanted sample.

        Before opening a shard it yields (its first position, None), so a reader that needs nothing from it yet
        stops without opening it."""
        i, offset = self.seq.locate(start)
        while True:
            url, first, count = self.seq.shard(i)
            yield first + offset, None
            got = 0
            try:
                stream = open_shard(url, self.retries)
            except OSError as err:
                self.report(url, None, f"shard skipped: {err}", count - offset)
            else:
                try:
                    errors = lambda err, url=url: self.report(url, None, f"unreadable: {err}", 0)  # noqa: E731
                    for sample in iter_shard(url, stream, errors):
                        if got == count:
                            log.warning("%s holds more samples than its index lists (%d); extra ignored", url, count)
                            break
                        if got >= offset:
                            yield first + got, sample
                        got += 1
                finally:
                    stream.close()
                if got < count:
                    lost = count - max(got, offset)
                    self.report(url, None, f"shard holds {got} of the {count} samples its index lists", lost)
            i, offset = i + 1, 0


class SourceMixer:
    """Which source each sample comes from: drawn by weight from a seeded generator, resumable by draw count."""

    def __init__(self, weights: list[float], seed: int, draws: int = 0) -> None:
        self.cdf = np.cumsum(weights) / sum(weights)
        self.rng = np.random.default_rng(seed)
        for chunk in range(0, draws, 1 << 20):
            self.rng.random(min(1 << 20, draws - chunk))
        self.draws = draws

    def next(self) -> int:
        self.draws += 1
        return min(int(np.searchsorted(self.cdf, self.rng.random(), side="right")), len(self.cdf) - 1)

    @staticmethod
    def counts(weights: list[float], seed: int, draws: int) -> list[int]:
        """Per-source sample counts after `draws` draws (same generator, vectorised)."""
        cdf = np.cumsum(weights) / sum(weights)
        rng, counts = np.random.default_rng(seed), np.zeros(len(weights), dtype=np.int64)
        for chunk in range(0, draws, 1 << 20):
            picks = np.searchsorted(cdf, rng.random(min(1 << 20, draws - chunk)), side="right")
            picks = np.minimum(picks, len(cdf) - 1)
            counts += np.bincount(picks, minlength=len(weights))
        return counts.tolist()


def _reader_seed(plan: StreamPlan, source: int, epoch: int, worker: int) -> int:
    return seed_of(plan.seed, source, epoch, plan.rank, worker, 3)


def _mixer_seed(plan: StreamPlan, epoch: int, worker: int) -> int:
    return seed_of(plan.seed, epoch, plan.rank, worker, 4)


class SlotBatches(torch.utils.data.IterableDataset):
    """What one loader worker (or the rank itself, without workers) makes: its share of each epoch's batches, epoch
    after epoch from the start place on, endless.

    One iterator spans all epochs, so a worker that has made its share of an epoch goes straight on to the next
    (opening its shards, filling its first shuffle block) while the rank still trains on the last epoch's batches.
    Started anew per epoch, every worker refilled its shuffle block at each epoch's start while the GPU waited: on
    one H100, `mixer run` of Mixer-B/16 from 8,000 JPEGs (an epoch every 31 steps) ran at 85% of the synthetic-input
    rate, and at 92% with an ImageNet-length epoch (docs/BENCHMARKS.md)."""

    def __init__(self, plan: StreamPlan, prepare: Callable, collate: Callable, start: dict) -> None:
        self.plan, self.prepare, self.collate, self.start = plan, prepare, collate, start

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        place = self.start["workers"][worker]
        for epoch in itertools.count(self.start["epoch"]):
            yield from self._epoch(epoch, worker, place)
            place = None

    def _epoch(self, epoch: int, worker: int, place: dict | None) -> Iterator[dict]:
        plan = self.plan
        events: list[dict] = []

        def report(url: str, key: str | None, reason: str, count: int) -> None:
            events.append({"url": url, "key": key, "reason": reason, "count": count})

        readers = [
            SourceReader(
                plan.sequence(s, epoch, worker),
                plan.block,
                _reader_seed(plan, s, epoch, worker),
                list(place["sources"][s]) if place else [0, 0],
                plan.open_retries,
                report,
            )
            for s in range(len(plan.sources))
        ]
        weights = [s.weight for s in plan.sources]
        mixer = SourceMixer(weights, _mixer_seed(plan, epoch, worker), place["draws"] if place else 0)
        limit = 10 * plan.micro_batch + CHECK_BAD_AFTER
        for n in range(place["batches"] if place else 0, plan.quota(worker)):
            torch.manual_seed(seed_of(plan.seed, epoch, plan.rank, worker, n, 5))
            images, labels, keys, failed = [], [], [], 0
            while len(images) < plan.micro_batch:
                s = mixer.next() if len(readers) > 1 else 0
                sample = readers[s].next()
                try:
                    image, label = self.prepare(sample, plan.sources[s].classes)
                    check_label(label, plan.num_classes)
                except BadSample as err:
                    report(sample.get("__url__", "?"), sample.get("__key__"), str(err), 1)
                    failed += 1
                    if failed > limit:
                        raise DataError(f"rank {plan.rank} worker {worker}: {failed} bad samples in a row") from err
                    continue
                images.append(image)
                labels.append(label)
                keys.append(f"{sample.get('__url__')}#{sample.get('__key__')}")
            yield {
                "epoch": epoch,
                "position": worker + n * plan.slots,
                "worker": worker,
                "images": self.collate(images),
                "labels": torch.tensor(labels, dtype=torch.long),
                "keys": keys,
                "place": {"batches": n + 1, "sources": [r.place() for r in readers], "draws": mixer.draws},
                "bad": events[:],
            }
            events.clear()
        # The loader takes one item from each worker in turn. A worker with a smaller share of this epoch pads it to
        # worker 0's (the largest), so that no worker drifts epochs ahead of the others while the rank waits.
        for _ in range(plan.quota(0) - plan.quota(worker)):
            yield {"epoch": epoch, "position": None, "worker": worker}


# --------------------------------------------------------------------------- the rank's stream


class Stream(Protocol):
    """What the training loop reads: batches, the position to save, and the bad-sample counts. `TrainStream` (CPU
    decode) is one; `data.gpu.Prefetched` (GPU decode, batches ahead) is one around a `TrainStream`."""

    plan: StreamPlan
    new_bad: deque[dict]  # bad-sample events since the owner last drained them

    @property
    def epoch(self) -> int: ...

    @property
    def position(self) -> int: ...  # batches of the current epoch handed out

    @property
    def read(self) -> int: ...

    @property
    def bad(self) -> int: ...

    def __next__(self) -> Batch: ...

    def state(self) -> dict: ...

    def close(self) -> None: ...


class TrainStream:
    """Endless training batches for this rank, with a checkpointable position (see the module docstring)."""

    def __init__(
        self,
        plan: StreamPlan,
        prepare: Callable,
        *,
        collate: Callable = torch.utils.data.default_collate,
        state: dict | None = None,
        max_bad_fraction: float = 0.01,
        prefetch: int = 2,
    ) -> None:
        plan.check()
        self.plan, self.max_bad_fraction, self.prefetch = plan, max_bad_fraction, prefetch
        start = start_position(plan, state)
        self.epoch, self.position, self.places = start["epoch"], start["position"], list(start["workers"])
        self.read, self.bad = start.get("read", 0), start.get("bad", 0)
        self.bad_by_shard: Counter[str] = Counter()
        self.new_bad: deque[dict] = deque(maxlen=1000)  # events since the owner last drained them
        self.last_keys: list[str] = []
        dataset = SlotBatches(plan, prepare, collate, start)
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=plan.num_workers,
            persistent_workers=plan.num_workers > 0,
            prefetch_factor=prefetch if plan.num_workers > 0 else None,
            worker_init_fn=_ignore_stop_signals,
            # Its own generator: starting an epoch's iterator must not draw from the training loop's random state
            # (which is seeded per step, so that mixup and dropout replay exactly after a resume).
            generator=torch.Generator().manual_seed(plan.seed),
        )
        self._batches = self._generate()

    def _generate(self) -> Iterator[dict]:
        """Batches in (epoch, position) order. Workers hand theirs over in turn, each worker's in order, and may be a
        few batches into the next epoch before this one ends: those wait in `pending`."""
        per_epoch, slots = self.plan.batches_per_epoch, self.plan.slots
        batches, pending = started_without_stop_signals(self.loader), {}
        while True:
            for p in range(self.position, per_epoch):
                while (self.epoch, p) not in pending:
                    item = next(batches)
                    if item["position"] is None:  # a worker's padding (`SlotBatches`)
                        continue
                    if item["epoch"] < self.epoch or len(pending) > 2 * slots * (self.prefetch + 1):
                        raise RuntimeError(
                            f"epoch {self.epoch}, batch {p}: worker {item['worker']} handed over batch "
                            f"{item['position']} of epoch {item['epoch']}; the workers are out of step"
                        )
                    pending[item["epoch"], item["position"]] = item
                yield pending.pop((self.epoch, p))
            self.epoch, self.position, self.places = self.epoch + 1, 0, [None] * slots

    def __iter__(self) -> TrainStream:
        return self

    def close(self) -> None:
        """Stop the loader workers now (an open epoch would otherwise keep them until interpreter exit)."""
        self._batches.close()
        if self.loader is not None and getattr(self.loader, "_iterator", None) is not None:
            # Persistent workers belong to the loader's kept iterator; DataLoader has no public close.
            self.loader._iterator._shutdown_workers()
        self.loader = None

    def __enter__(self) -> TrainStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __next__(self) -> Batch:
        item = next(self._batches)
        self.position = item["position"] + 1
        self.places[item["worker"]] = item["place"]
        self.last_keys = item["keys"]
        self.read += len(item["keys"])
        self.count_bad(item["bad"], read=True)
        return item["images"], item["labels"]

    def count_bad(self, events: list[dict], read: bool = False) -> None:
        """Count bad samples (`{"url", "key", "reason", "count"}`), found by the workers (`read`: not among the
        samples counted as read yet) or later, by the caller (an image that the GPU could not decode); then stop
        with `DataError` if there are too many."""
        for event in events:
            self.bad += event["count"]
            self.read += event["count"] if read else 0
            self.bad_by_shard[event["url"]] += event["count"]
            self.new_bad.append(event)
        judged = self.read >= CHECK_BAD_AFTER or self.bad >= CHECK_BAD_FROM
        if judged and self.bad > self.max_bad_fraction * self.read:
            worst = ", ".join(f"{url} ({n})" for url, n in self.bad_by_shard.most_common(3))
            raise DataError(
                f"rank {self.plan.rank}: {self.bad} of {self.read} samples read are bad "
                f"({self.bad / self.read:.1%} > data.max_bad_fraction {self.max_bad_fraction:.1%}); worst shards: "
                f"{worst}"
            )

    def state(self) -> dict:
        """This rank's position, JSON-serialisable, for the checkpoint."""
        epoch, position, places = self.epoch, self.position, self.places
        if position == self.plan.batches_per_epoch:
            epoch, position, places = epoch + 1, 0, [None] * self.plan.slots
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "position": position,
            "global_samples": (epoch * self.plan.batches_per_epoch + position)
            * self.plan.world_size
            * self.plan.micro_batch,
            "layout": self.plan.layout(),
            "workers": list(places),  # a copy: the stream replaces its entries as it reads on
            "read": self.read,
            "bad": self.bad,
        }


def start_position(plan: StreamPlan, state: dict | None) -> dict:
    """Where a stream starts: the beginning, a saved position of the same layout, or one remapped from another."""
    if state is None:
        return {"epoch": 0, "position": 0, "workers": [None] * plan.slots}
    if state.get("version") != STATE_VERSION:
        raise DataError(f"data position of version {state.get('version')}, this reader understands {STATE_VERSION}")
    if state["layout"] == plan.layout():
        return state
    micro_batches = state["global_samples"] // (plan.world_size * plan.micro_batch)
    epoch, position = divmod(micro_batches, plan.batches_per_epoch)
    log.warning(
        "data layout changed (%s -> %s): continuing at global sample %d = epoch %d, batch %d of this layout",
        state["layout"],
        plan.layout(),
        state["global_samples"],
        epoch,
        position,
    )
    weights = [s.weight for s in plan.sources]
    workers = []
    for worker in range(plan.slots):
        batches = len(range(worker, position, plan.slots))
        draws = batches * plan.micro_batch
        mixed = len(weights) > 1
        per_source = SourceMixer.counts(weights, _mixer_seed(plan, epoch, worker), draws) if mixed else [draws]
        places = [list(divmod(n, plan.block)) for n in per_source]
        workers.append({"batches": batches, "sources": places, "draws": draws if mixed else 0})
    return {"epoch": epoch, "position": position, "workers": workers, "read": state["read"], "bad": state["bad"]}


# --------------------------------------------------------------------------- evaluation


def _warn_and_skip(err: Exception) -> bool:
    log.warning("skipped an evaluation sample: %s", err)
    return True


def _to_pair(transform: Callable, num_classes: int | None) -> Callable[[dict], tuple[torch.Tensor, int]]:
    prepare = cpu_prepare(transform)

    def pair(sample: dict) -> tuple[torch.Tensor, int]:
        try:
            image, label = prepare(sample, ())
            return image, check_label(label, num_classes)
        except BadSample as err:
            raise BadSample(f"{sample.get('__url__')}#{sample.get('__key__')}: {err}") from err

    return pair


def eval_batches(
    index: ShardIndex,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    transform: Callable,
    image_size: int,
    num_workers: int,
    num_classes: int | None = None,
) -> Iterator[Batch]:
    """Every held-out sample once. Ranks get shards round-robin; all yield `num_eval_batches(...)` batches.

    Padding batches hold one blank image labelled -1, which the evaluator ignores.
    """
    urls = index.urls[rank::world_size]
    total = num_eval_batches(index, world_size, batch_size)
    produced = 0
    if urls:
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=_warn_and_skip),
            wds.map(_to_pair(transform, num_classes), handler=_warn_and_skip),
            wds.batched(batch_size, partial=True),
        )
        workers = min(num_workers, len(urls))
        loader = torch.utils.data.DataLoader(
            pipeline, batch_size=None, num_workers=workers, worker_init_fn=_ignore_stop_signals
        )
        # Workers each end on a partial batch: re-batch in this process so the count is exact.
        rebatched = wds.batched(batch_size, partial=True)(wds.unbatched()(started_without_stop_signals(loader)))
        for batch in rebatched:
            produced += 1
            yield batch[0], batch[1]
    if produced > total:
        raise RuntimeError(f"rank {rank} read {produced} eval batches, more than the index allows ({total})")
    for _ in range(total - produced):
        yield torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8), torch.full((1,), -1, dtype=torch.long)


def num_eval_batches(index: ShardIndex, world_size: int, batch_size: int) -> int:
    """The largest per-rank batch count under round-robin shard dealing, from the index alone."""
    per_rank = [sum(index.counts[r::world_size]) for r in range(world_size)]
    return max(math.ceil(n / batch_size) for n in per_rank)
