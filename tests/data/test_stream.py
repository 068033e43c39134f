import io
import json
import os
import signal
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import webdataset as wds
from PIL import Image

from pipeline.config import AugmentConfig
from pipeline.data import synthetic
from pipeline.data.index import DataError, ShardIndex, read_index
from pipeline.data.sources import ensure_index, expand, index_shards
from pipeline.data.stream import (
    SourceMixer,
    StreamPlan,
    TrainStream,
    _ignore_stop_signals,
    cpu_prepare,
    eval_batches,
    num_eval_batches,
    split_shares,
    started_without_stop_signals,
)
from pipeline.data.transforms import eval_transform, train_transform
from pipeline.dist import free_port
from tests.conftest import run_mixer

PREPARE = cpu_prepare(train_transform(AugmentConfig(crop_scale=(0.5, 1.0)), 16))


def uneven_shards(root: Path, sizes: tuple[int, ...]) -> ShardIndex:
    """Shards of the given sample counts, written by the project's writer (one call per shard)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(sizes):
        synthetic.write_dataset("shapes", root / f"part{i}", samples=n, size=16, seed=i, max_count=n)
        (root / f"part{i}" / "shard-000000.tar").rename(root / f"s{i}.tar")
    return read_index(ensure_index(str(root), None, root))


def plan_for(source, *, rank=0, world=1, workers=0, batch=8, mode="split", block=40, sources=None, epoch=None):
    sources = sources or (source,)
    total = epoch or sum(s.num_samples for s in sources)
    return StreamPlan(tuple(sources), mode, rank, world, workers, batch, 7, block, total, open_retries=0)


def take(stream: TrainStream, n: int) -> list[tuple[list[str], torch.Tensor]]:
    out = []
    for _ in range(n):
        images, _ = next(stream)
        out.append((list(stream.last_keys), images.clone()))
    return out


def same(a, b, keys_only_after_hash: bool = False) -> bool:
    """Same sample keys and bit-identical images, batch by batch (keys compared without their shard URL if asked)."""

    def key(k: str) -> str:
        return k.split("#")[1] if keys_only_after_hash else k

    return len(a) == len(b) and all(
        [key(k) for k in ka] == [key(k) for k in kb] and torch.equal(ia, ib) for (ka, ia), (kb, ib) in zip(a, b)
    )


def test_split_shares_are_disjoint_and_balanced():
    counts = (500, 20, 30, 260, 240, 10, 300, 250)
    shares = split_shares(counts, 3, seed=1)
    assert sorted(i for share in shares for i in share) == list(range(8))
    totals = sorted(sum(counts[i] for i in share) for share in shares)
    assert totals[-1] - totals[0] <= 500  # never worse than the largest shard
    assert split_shares(counts, 3, seed=1) == shares and split_shares(counts, 3, seed=2) != shares


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_epoch_length_does_not_depend_on_workers(tmp_path_factory, workers):
    source = uneven_shards(tmp_path_factory.mktemp("uneven"), (90, 30, 12, 60, 8))
    plan = plan_for(source, workers=workers)
    assert plan.batches_per_epoch == 200 // 8
    with TrainStream(plan, PREPARE) as stream:
        seen = take(stream, plan.batches_per_epoch)
        assert stream.epoch == 0 and stream.state()["epoch"] == 1 and stream.state()["position"] == 0
        take(stream, 1)
        assert stream.epoch == 1 and stream.position == 1
    keys = [k for batch, _ in seen for k in batch]
    # One epoch reads each slot's shards once, cut or repeated where a slot's share and quota differ.
    assert len(keys) == 200 and len(set(keys)) >= 150


def test_workers_run_on_into_the_next_epoch_in_step_with_each_other(tmp_path):
    """One loader iterator spans all epochs. With 7 batches an epoch over 3 workers (shares 3, 2, 2), the workers with
    the smaller shares must not drift further into later epochs each epoch (the stream would buffer ever more)."""
    source = uneven_shards(tmp_path / "s", (40, 16))
    plan = plan_for(source, workers=3, batch=8, mode="resampled")
    assert plan.batches_per_epoch == 7 and [plan.quota(w) for w in range(3)] == [3, 2, 2]
    epochs = 12
    with TrainStream(plan, PREPARE) as stream:
        seen = []
        for _ in range(epochs * 7):
            next(stream)
            seen.append((stream.epoch, stream.position - 1))
        state = stream.state()
    assert seen == [(e, p) for e in range(epochs) for p in range(7)]
    assert (state["epoch"], state["position"]) == (epochs, 0)


def _rank_main(rank: int, source: ShardIndex, out: str, port: int) -> None:
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    plan = plan_for(source, rank=rank, world=2, workers=1, batch=10)
    steps = 0
    with TrainStream(plan, PREPARE) as stream:
        for _ in range(2 * plan.batches_per_epoch):  # two epochs, a collective after every batch
            images, labels = next(stream)
            total = torch.tensor([float(labels.numel())])
            torch_dist.all_reduce(total)
            assert total.item() == 20
            steps += 1
        Path(out, f"rank{rank}.json").write_text(json.dumps({"steps": steps, "epoch": stream.epoch}))
    torch_dist.destroy_process_group()


def test_two_ranks_on_very_uneven_shards_run_the_same_steps(tmp_path):
    source = uneven_shards(tmp_path / "s", (150, 25, 5))  # 3 shards of very different sizes
    ctx, port = mp.get_context("spawn"), free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, source, str(tmp_path), port)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0, "a rank failed or hung"
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1] == {"steps": 2 * (180 // 20), "epoch": 1}


def test_split_mode_refuses_fewer_shards_than_ranks_times_workers(tmp_path):
    source = uneven_shards(tmp_path / "s", (150, 25, 5))
    with pytest.raises(DataError, match=r"3 shards, fewer than ranks x workers = 2 x 2"):
        plan_for(source, world=2, workers=2).check()
    plan_for(source, world=2, workers=2, mode="resampled").check()  # resampled mode has no such limit


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("mode", ["split", "resampled"])
def test_resume_continues_with_exactly_the_same_batches(tmp_path_factory, workers, mode):
    source = uneven_shards(tmp_path_factory.mktemp("r"), (90, 30, 12, 60, 8))
    plan = plan_for(source, workers=workers, mode=mode)
    with TrainStream(plan, PREPARE) as stream:
        reference = take(stream, 60)  # more than two epochs
    for k in (7, 25):  # mid-epoch, and at an epoch boundary
        with TrainStream(plan, PREPARE) as stream:
            head = take(stream, k)
            state = json.loads(json.dumps(stream.state()))  # as stored in a checkpoint
        with TrainStream(plan, PREPARE, state=state) as resumed:
            tail = take(resumed, 60 - k)
        assert same(head + tail, reference), f"resumed after {k} batches differs"


def test_resume_does_not_reread_earlier_shards(tmp_path):
    source = uneven_shards(tmp_path / "s", (40, 40, 40, 40))
    plan = plan_for(source, block=40, batch=8)
    with TrainStream(plan, PREPARE) as stream:
        take(stream, 12)  # 96 samples: the third block has begun
        state = stream.state()
    (place,) = state["workers"]
    assert place["sources"] == [[2, 16]]  # block 2, 16 of its samples taken
    # Make every shard but those holding block 2 unreadable: the resumed stream must not need them.
    seq = plan.sequence(0, 0, 0)
    needed = {seq.shard(seq.locate(p)[0])[0] for p in range(80, 120)}
    for url in set(source.urls) - needed:
        Path(url).write_bytes(b"")
    with TrainStream(plan, PREPARE, state=state) as resumed:
        take(resumed, 3)  # 24 samples: within block 2
        assert resumed.bad == 0


def test_world_size_change_remaps_by_global_sample_count(tmp_path):
    source = uneven_shards(tmp_path / "s", (60, 60, 60, 60))
    two = [plan_for(source, rank=r, world=2, workers=1, batch=8) for r in range(2)]
    states = []
    for plan in two:
        with TrainStream(plan, PREPARE) as stream:
            take(stream, 5)  # 2 ranks x 5 x 8 = 80 global samples
            states.append(stream.state())
    assert states[0]["global_samples"] == states[1]["global_samples"] == 80
    one = plan_for(source, rank=0, world=1, workers=1, batch=8)
    with TrainStream(one, PREPARE, state=states[0]) as resumed:
        assert (resumed.epoch, resumed.position) == (0, 10)  # where a 1-rank run is after 80 samples
        tail = take(resumed, 4)
    with TrainStream(one, PREPARE) as fresh:
        reference = take(fresh, 14)[10:]
    assert same(tail, reference)
    three = plan_for(source, rank=2, world=3, workers=1, batch=8)
    with TrainStream(three, PREPARE, state=states[0]) as resumed:
        assert (resumed.epoch, resumed.position) == (0, 3)  # 80 // 24


def corrupt_shards(root: Path) -> ShardIndex:
    """Three shards of 20: one holds a corrupt JPEG and a sample without a label; one is truncated mid-member."""
    root.mkdir()
    synthetic.write_dataset("shapes", root / "src", samples=60, size=16, seed=0, max_count=20)
    index = read_index(root / "src")
    good = [dict(s) for s in wds.WebDataset(index.urls, shardshuffle=False)]
    with wds.TarWriter(str(root / "a.tar")) as sink:
        for i, s in enumerate(good[:20]):
            sample = {"__key__": s["__key__"], "jpg": s["jpg"], "cls": s["cls"]}
            if i == 3:
                sample["jpg"] = b"\xff\xd8 this is not a JPEG"
            if i == 7:
                del sample["cls"]
            sink.write(sample)
    with wds.TarWriter(str(root / "b.tar")) as sink:
        for s in good[20:40]:
            sink.write({"__key__": s["__key__"], "jpg": s["jpg"], "cls": s["cls"]})
    data = (root / "b.tar").read_bytes()
    (root / "b.tar").write_bytes(data[: len(data) // 2 + 300])  # cut inside a member
    with wds.TarWriter(str(root / "c.tar")) as sink:
        for s in good[40:60]:
            sink.write({"__key__": s["__key__"], "jpg": s["jpg"], "cls": s["cls"]})
    # the index lists what was written: 20 each
    index_file = root / "index.json"
    index_file.write_text(
        json.dumps(
            {
                "format": "mixer-shards/1",
                "classes": [],
                "shards": [{"url": n, "num_samples": 20} for n in ("a.tar", "b.tar", "c.tar")],
            }
        )
    )
    return read_index(str(index_file))


def test_bad_samples_and_truncated_members_are_skipped_and_counted(tmp_path):
    source = corrupt_shards(tmp_path / "bad")
    with tarfile.open(source.urls[1]) as tar, pytest.raises(tarfile.ReadError):
        tar.getmembers()  # b.tar really is truncated
    plan = plan_for(source, batch=5, epoch=60)
    with TrainStream(plan, PREPARE, max_bad_fraction=1.0) as stream:
        batches = take(stream, plan.batches_per_epoch)
        events = list(stream.new_bad)
        bad, read = stream.bad, stream.read
    keys = {k.split("#")[1] for batch, _ in batches for k in batch}
    assert all(images.shape == (5, 3, 16, 16) for _, images in batches)
    # The epoch (60 samples) is longer than what the shards hold: the slot cycles, and meets its bad samples again.
    by_reason = {e["reason"].split(":")[0]: e for e in events}
    corrupt, unlabelled = (
        by_reason["image does not decode"],
        by_reason["no label (.cls, .json label/cls/class or .txt)"],
    )
    assert corrupt["url"] == unlabelled["url"] == source.urls[0]
    assert {corrupt["key"], unlabelled["key"]} == {"shapes-0-0000003", "shapes-0-0000007"}
    assert not keys & {"shapes-0-0000003", "shapes-0-0000007"}
    truncated = [e for e in events if "samples its index lists" in e["reason"]]
    assert truncated and all(e["url"] == source.urls[1] and 1 <= e["count"] <= 15 for e in truncated)
    assert bad == sum(e["count"] for e in events) and read == 60 + bad


def test_too_many_bad_samples_stop_the_run(tmp_path):
    source = corrupt_shards(tmp_path / "bad")
    plan = plan_for(source, batch=5, epoch=60)
    with TrainStream(plan, PREPARE, max_bad_fraction=0.01) as stream, pytest.raises(DataError, match="bad"):
        take(stream, 400)  # the check starts after 1,000 samples read


def test_a_shard_that_does_not_open_is_skipped_and_reported(tmp_path):
    source = uneven_shards(tmp_path / "s", (30, 30))
    missing = ShardIndex("gone", (source.urls[0], str(tmp_path / "missing.tar")), (30, 30))
    with TrainStream(plan_for(missing, batch=10, mode="resampled"), PREPARE, max_bad_fraction=1.0) as stream:
        take(stream, 8)
        assert stream.bad_by_shard[str(tmp_path / "missing.tar")] >= 30
        assert any("shard skipped" in e["reason"] for e in stream.new_bad)


def test_foreign_shards_with_other_keys_and_labels(tmp_path):
    """Shards written by webdataset.ShardWriter directly: .jpeg/.png/.webp images, .cls/.txt/.json labels."""
    root = tmp_path / "foreign"
    root.mkdir()
    with wds.ShardWriter(str(root / "part-%03d.tar"), maxcount=12) as sink:
        for i in range(36):
            image = Image.new("RGB", (20, 16), (7 * i, 255 - 7 * i, 90))
            fmt, ext = [("JPEG", "jpeg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
            buf = io.BytesIO()
            image.save(buf, fmt)
            label = [{"cls": i % 4}, {"txt": str(i % 4)}, {"json": {"label": i % 4}}][(i // 3) % 3]
            sink.write({"__key__": f"img{i:04d}", ext: buf.getvalue(), **label})
    location = ensure_index(str(root), None, tmp_path)  # no index.json: counted once, written beside the shards
    source = read_index(location)
    assert source.counts == (12, 12, 12) and Path(location) == root / "index.json"
    with TrainStream(plan_for(source, batch=6, block=36), PREPARE, max_bad_fraction=0.0) as stream:
        batches = [next(stream) for _ in range(6)]
    labels = torch.cat([y for _, y in batches])
    assert stream.bad == 0 and sorted(Counter(labels.tolist()).values()) == [9, 9, 9, 9]


def test_pipe_and_fsspec_sources(tmp_path):
    source = uneven_shards(tmp_path / "s", (20, 20))
    pattern = f"pipe:cat {tmp_path}/s/s{{0..1}}.tar"
    with pytest.raises(ValueError, match="mixer shards index"):
        ensure_index(pattern, None, tmp_path / "cache")  # streaming every remote shard at launch: not silently
    index_shards(expand(pattern), tmp_path / "pipe-index.json")  # what `mixer shards index PATTERN` does
    piped = read_index(ensure_index(pattern, str(tmp_path / "pipe-index.json"), tmp_path / "cache"), expand(pattern))
    assert piped.counts == (20, 20) and piped.urls[0] == f"pipe:cat {tmp_path}/s/s0.tar"
    with TrainStream(plan_for(piped, batch=8), PREPARE) as stream:
        via_pipe = take(stream, 4)
    with TrainStream(plan_for(source, batch=8), PREPARE) as stream:
        assert same(via_pipe, take(stream, 4), keys_only_after_hash=True)
    # An object store through fsspec (the in-memory filesystem stands in for s3://).
    import fsspec

    fs = fsspec.filesystem("memory")
    for url in source.urls:
        fs.pipe(f"/bucket/{Path(url).name}", Path(url).read_bytes())
    fs.pipe("/bucket/index.json", json.dumps({"format": "mixer-shards/1", "shards": [
        {"url": "s0.tar", "num_samples": 20}, {"url": "s1.tar", "num_samples": 20}]}).encode())  # fmt: skip
    remote = read_index("memory://bucket/index.json")
    assert remote.urls == ("memory://bucket/s0.tar", "memory://bucket/s1.tar")
    with TrainStream(plan_for(remote, batch=8), PREPARE) as stream:
        assert same(via_pipe, take(stream, 4), keys_only_after_hash=True)


def test_sources_mix_by_weight_and_resume(tmp_path):
    a = uneven_shards(tmp_path / "a", (100, 100))
    b = uneven_shards(tmp_path / "b", (100, 100))
    a, b = ShardIndex("a", a.urls, a.counts, 3.0), ShardIndex("b", b.urls, b.counts, 1.0)
    plan = plan_for(a, sources=(a, b), batch=10, workers=1)
    with TrainStream(plan, PREPARE) as stream:
        reference = take(stream, 30)
    from_a = sum(k.startswith(str(tmp_path / "a")) for keys, _ in reference for k in keys)
    assert 0.68 < from_a / 300 < 0.82
    with TrainStream(plan, PREPARE) as stream:
        head = take(stream, 11)
        state = stream.state()
    with TrainStream(plan, PREPARE, state=state) as resumed:
        assert same(head + take(resumed, 19), reference)
    # The vectorised count (used to remap a position) agrees with drawing one by one.
    mixer = SourceMixer([3.0, 1.0], 5)
    drawn = Counter(mixer.next() for _ in range(1000))
    assert SourceMixer.counts([3.0, 1.0], 5, 1000) == [drawn[0], drawn[1]]


def test_eval_covers_every_sample_once_with_equal_batches_per_rank(tmp_path):
    # Uneven shards: 100, 100, 50 samples.
    index = synthetic.write_dataset("shapes", tmp_path, samples=250, size=16, seed=3, max_count=100)
    transform = eval_transform(AugmentConfig(), 16)
    per_rank = []
    for rank in range(2):
        batches = list(
            eval_batches(
                index, rank=rank, world_size=2, batch_size=64, transform=transform, image_size=16, num_workers=2
            )
        )
        per_rank.append(batches)
    assert len(per_rank[0]) == len(per_rank[1]) == num_eval_batches(index, 2, 64)
    labels = torch.cat([y for batches in per_rank for _, y in batches])
    assert (labels >= 0).sum() == 250
    assert per_rank[0][0][0].dtype == torch.uint8


def test_an_index_cannot_run_a_command_or_reach_another_scheme(tmp_path):
    """index.json is data: a `pipe:` entry (webdataset would run it in a shell during an ordinary `mixer run`) or
    another scheme's URL is refused before any shard is opened; the config's own pipe: source still works."""
    from pipeline.config import DatasetConfig, SourceConfig
    from pipeline.data.sources import prepare_sources

    source = uneven_shards(tmp_path / "s", (20, 20))
    index = tmp_path / "s" / "index.json"
    planted = tmp_path / "ran"
    data = json.loads(index.read_text())
    for url in (f"pipe:touch {planted}", "s3://elsewhere/s0.tar"):
        data["shards"][0]["url"] = url
        index.write_text(json.dumps(data))
        with pytest.raises(DataError, match="is not a file of this data set"):
            prepare_sources(DatasetConfig(path=str(tmp_path), num_classes=4, train_split="s"), tmp_path / "cache")
        assert not planted.exists()
    pattern = f"pipe:cat {tmp_path}/s/s{{0..1}}.tar"
    index_shards(expand(pattern), tmp_path / "pipe-index.json")
    config = DatasetConfig(path=str(tmp_path), num_classes=4, sources=[SourceConfig(url=pattern, index=str(
        tmp_path / "pipe-index.json"))])  # fmt: skip
    assert prepare_sources(config, tmp_path / "cache")[0].counts == source.counts


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_indexing_a_broken_tar_names_the_file(tmp_path, damage):
    source = uneven_shards(tmp_path / "s", (20, 20))
    broken = Path(source.urls[1])
    data = broken.read_bytes()
    broken.write_bytes(b"" if damage == "empty" else data[: len(data) // 2 + 100])
    result = run_mixer("shards", "index", str(tmp_path / "s"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"mixer: error: {broken} is not a readable tar shard" in result.stderr


def test_a_label_outside_the_classes_is_a_bad_sample_named_and_counted(tmp_path):
    """The shapes have 8 classes; a data set declared with 5 would fail in the loss mid-run ('Target 6 is out of
    bounds'): those samples are skipped, counted and named instead."""
    import dataclasses

    source = uneven_shards(tmp_path / "s", (40, 40))
    plan = dataclasses.replace(plan_for(source, batch=8), num_classes=5)
    with TrainStream(plan, PREPARE, max_bad_fraction=1.0) as stream:
        labels = torch.cat([next(stream)[1] for _ in range(4)])
        events = list(stream.new_bad)
    assert labels.max() < 5 and stream.bad == sum(e["count"] for e in events) > 0
    assert all(e["key"] and e["url"].endswith(".tar") and "is outside 0..4" in e["reason"] for e in events)


def _stopped_while_starting(worker_id: int) -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # the launcher's stop signal, before the worker has set itself up
    _ignore_stop_signals(worker_id)


def test_a_stop_signal_while_loader_workers_start_does_not_end_them():
    """A SIGTERM that reaches a worker before its `worker_init_fn` ran used to end it (torch's own handler is in
    place by then): the rank's evaluation failed with "DataLoader worker exited unexpectedly" instead of finishing."""
    loader = torch.utils.data.DataLoader(range(8), batch_size=4, num_workers=2, worker_init_fn=_stopped_while_starting)
    assert [batch.tolist() for batch in started_without_stop_signals(loader)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
