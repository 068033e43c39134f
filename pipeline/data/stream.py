"""Streaming shards into batches with webdataset.

Training draws shards with replacement (`ResampledShards`): the stream never ends, so uneven shard sizes can
never leave one rank waiting in a collective. Evaluation reads every held-out sample exactly once, shards dealt
round-robin over ranks, and pads so that every rank runs the same number of batches.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable, Iterator

import torch
import webdataset as wds

from pipeline.data.shards import IMAGE_EXTENSIONS, ShardIndex
from pipeline.data.transforms import decode

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, 3, H, W) float32, labels (B,) int64
IMAGE_KEYS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 to their rank, which saves before exiting (and takes them along):
    launchers signal a rank's whole process group, and a worker dying first would abort the save."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _warn_and_skip(err: Exception) -> bool:
    log.warning("skipped a sample: %s", err)
    return True


def _to_pair(transform: Callable) -> Callable[[dict], tuple[torch.Tensor, int]]:
    def convert(sample: dict) -> tuple[torch.Tensor, int]:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None or "cls" not in sample:
            raise ValueError(f"sample {sample.get('__key__')} of {sample.get('__url__')} lacks an image or a label")
        return transform(decode(sample[key])), int(sample["cls"])

    return convert


def train_batches(
    index: ShardIndex,
    *,
    batch_size: int,
    transform: Callable,
    num_workers: int,
    shuffle_buffer: int,
    seed: int,
) -> Iterator[Batch]:
    """An endless stream of augmented batches; each rank and loader worker draws its own shard sequence."""
    pipeline = wds.DataPipeline(
        # deterministic=True seeds each (rank, worker) from `seed` and its own position in the job.
        wds.ResampledShards(index.urls, seed=seed, deterministic=True),
        wds.tarfile_to_samples(handler=_warn_and_skip),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 200), seed=seed),
        wds.map(_to_pair(transform), handler=_warn_and_skip),
        wds.batched(batch_size, partial=False),
    )
    loader = wds.WebLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        worker_init_fn=_ignore_stop_signals,
    )
    yield from loader


def eval_batches(
    index: ShardIndex,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    transform: Callable,
    image_size: int,
    num_workers: int,
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
            wds.map(_to_pair(transform), handler=_warn_and_skip),
            wds.batched(batch_size, partial=True),
        )
        workers = min(num_workers, len(urls))
        # Workers each end on a partial batch: re-batch in this process so the count is exact.
        loader = wds.WebLoader(
            pipeline, batch_size=None, num_workers=workers, worker_init_fn=_ignore_stop_signals
        ).unbatched()
        for batch in loader.batched(batch_size, partial=True):
            produced += 1
            yield batch[0], batch[1]
    if produced > total:
        raise RuntimeError(f"rank {rank} read {produced} eval batches, more than the index allows ({total})")
    for _ in range(total - produced):
        yield torch.zeros(1, 3, image_size, image_size), torch.full((1,), -1, dtype=torch.long)


def num_eval_batches(index: ShardIndex, world_size: int, batch_size: int) -> int:
    """The largest per-rank batch count under round-robin shard dealing, from the index alone."""
    per_rank = [sum(index.counts[r::world_size]) for r in range(world_size)]
    return max(math.ceil(n / batch_size) for n in per_rank)
