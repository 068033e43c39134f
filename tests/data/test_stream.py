import itertools
from collections import Counter

import pytest
import torch

from pipeline.config import AugmentConfig
from pipeline.data import synthetic
from pipeline.data.shards import read_index
from pipeline.data.stream import eval_batches, num_eval_batches, train_batches
from pipeline.data.transforms import eval_transform, train_transform


@pytest.mark.parametrize("workers", [0, 2])
def test_train_stream_is_endless_and_shaped(shapes_shards, workers):
    index = read_index(shapes_shards)
    batches = train_batches(
        index,
        batch_size=32,
        transform=train_transform(AugmentConfig(), 16),
        num_workers=workers,
        shuffle_buffer=50,
        seed=0,
    )
    seen = list(itertools.islice(batches, 12))  # 384 samples > the 300 in the split: it must wrap around
    for images, labels in seen:
        assert images.shape == (32, 3, 16, 16) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < 8


def test_train_stream_is_reproducible_from_its_seed(shapes_shards):
    index = read_index(shapes_shards)

    def first_labels(seed):
        stream = train_batches(
            index,
            batch_size=16,
            transform=eval_transform(AugmentConfig(), 16),
            num_workers=0,
            shuffle_buffer=50,
            seed=seed,
        )
        return [b[1].tolist() for b in itertools.islice(stream, 4)]

    assert first_labels(5) == first_labels(5)
    assert first_labels(5) != first_labels(6)


def test_eval_covers_every_sample_once_with_equal_batches_per_rank(tmp_path):
    # Uneven shards: 100, 100, 50 samples.
    index = synthetic.write_dataset("novel-shapes", tmp_path / "eval", samples=250, size=16, seed=3, max_count=100)
    expected = Counter(s.label for s in synthetic.generate("novel-shapes", 250, 16, seed=3))
    transform = eval_transform(AugmentConfig(eval_crop="resmall-crop"), 16)
    seen: Counter = Counter()
    per_rank = []
    for rank in range(2):
        batches = list(
            eval_batches(
                index, rank=rank, world_size=2, batch_size=64, transform=transform, image_size=16, num_workers=2
            )
        )
        per_rank.append(len(batches))
        for images, labels in batches:
            assert images.shape[1:] == (3, 16, 16)
            seen.update(labels[labels >= 0].tolist())
    assert seen == expected
    assert per_rank == [3, 3] == [num_eval_batches(index, 2, 64)] * 2  # rank 1 pads one batch


def test_more_ranks_than_shards_still_gives_every_rank_its_batches(tmp_path):
    index = synthetic.write_dataset("shapes", tmp_path / "eval", samples=40, size=16, seed=0, max_count=100)
    transform = eval_transform(AugmentConfig(), 16)
    counts = [
        len(
            list(
                eval_batches(
                    index, rank=r, world_size=3, batch_size=16, transform=transform, image_size=16, num_workers=1
                )
            )
        )
        for r in range(3)
    ]
    assert counts == [3, 3, 3]


def test_corrupt_image_is_skipped_not_fatal(tmp_path):
    from pipeline.data.shards import Sample, write_shards

    good = list(synthetic.generate("shapes", 20, 16, seed=0))
    bad = Sample(key="broken", image=b"\xff\xd8 not a jpeg", ext="jpg", label=1)
    index = write_shards([*good[:10], bad, *good[10:]], tmp_path / "s", classes=["x"] * 8, progress=False)
    batches = list(
        eval_batches(
            index,
            rank=0,
            world_size=1,
            batch_size=8,
            transform=eval_transform(AugmentConfig(), 16),
            image_size=16,
            num_workers=0,
        )
    )
    assert sum(int((b[1] >= 0).sum()) for b in batches) == 20
