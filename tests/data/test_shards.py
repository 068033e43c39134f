import csv
import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from pipeline.data.index import read_index
from pipeline.data.shards import items_from_folder, items_from_manifest, write_dataset_shards
from tests.conftest import run_mixer


def make_folder(root, per_class=(5, 3)):
    for c, n in enumerate(per_class):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (20, 10), (40 * c, 10 * i, 0)).save(d / f"img{i}.{'png' if i % 2 else 'jpeg'}")
    return root


def write(items, out, **kw):
    return write_dataset_shards(items, out, classes=kw.pop("classes", []), progress=False, **{"workers": 2, **kw})


def test_folder_to_shards_with_count_limit(tmp_path):
    classes, items = items_from_folder(make_folder(tmp_path / "src"))
    index, report = write(items, tmp_path / "out", classes=classes, max_count=3)
    assert classes == ["class_0", "class_1"] and len(items) == 8
    assert index.counts == (3, 3, 2) and index.num_samples == 8 and report["failed"] == []
    assert read_index(tmp_path / "out") == index
    # Plain tar tools see three members per sample.
    with tarfile.open(index.urls[0]) as tar:
        names = tar.getnames()
    assert sorted(names[:3]) == ["000000000.cls", "000000000.jpg", "000000000.json"]


def test_shards_are_readable_by_plain_webdataset(tmp_path):
    classes, items = items_from_folder(make_folder(tmp_path / "src"))
    index, _ = write(items, tmp_path / "out", classes=classes)
    records = list(wds.WebDataset(index.urls, shardshuffle=False).decode("pil"))
    assert len(records) == 8
    labels = sorted(r["cls"] for r in records)
    assert labels == [0] * 5 + [1] * 3
    png = next(r for r in records if "png" in r)
    assert png["png"].size == (20, 10)
    assert png["json"]["class"] in classes


def test_size_limit_splits_shards(tmp_path):
    classes, items = items_from_folder(make_folder(tmp_path / "src", per_class=(10, 10)))
    index, _ = write(items, tmp_path / "out", classes=classes, max_bytes=2500)
    assert len(index.urls) > 2 and index.num_samples == 20


def test_undecodable_images_are_left_out_and_reported(tmp_path):
    src = make_folder(tmp_path / "src")
    (src / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (src / "class_0" / "empty.png").write_bytes(b"")
    classes, items = items_from_folder(src)
    index, report = write(items, tmp_path / "out", classes=classes, max_count=4)
    assert index.num_samples == 8 and report["items"] == 10
    assert sorted(Path(f["source"]).name for f in report["failed"]) == ["broken.jpg", "empty.png"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["failed"] == report["failed"]


def test_rerun_resumes_and_skips_finished_shards(tmp_path):
    classes, items = items_from_folder(make_folder(tmp_path / "src", per_class=(6, 6)))
    index, _ = write(items, tmp_path / "out", classes=classes, max_count=4)
    first = {url: Path(url).stat().st_mtime_ns for url in index.urls}
    Path(index.urls[1]).unlink()  # as if killed while writing shard 1
    again, report = write(items, tmp_path / "out", classes=classes, max_count=4)
    assert report["resumed_shards"] == 2 and again == index
    assert Path(index.urls[0]).stat().st_mtime_ns == first[index.urls[0]]  # not rewritten
    with pytest.raises(ValueError, match="different plan"):
        write(items, tmp_path / "out", classes=classes, max_count=3)


def test_max_side_reencodes_large_images(tmp_path):
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    Image.new("RGB", (400, 300), (10, 200, 30)).save(src / "big.png")
    Image.new("RGB", (40, 30), (10, 200, 30)).save(src / "small.png")
    classes, items = items_from_folder(tmp_path / "src")
    index, _ = write(items, tmp_path / "out", classes=classes, max_side=100)
    records = list(wds.WebDataset(index.urls, shardshuffle=False).decode("pil"))
    by_source = {r["json"]["source"]: r for r in records}
    assert by_source["a/big.png"]["jpg"].size == (100, 75)  # re-encoded as JPEG, longest side 100
    assert by_source["a/small.png"]["png"].size == (40, 30)  # small enough: stored as is


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_manifest_with_class_names_and_extra_fields(tmp_path, kind):
    folder = make_folder(tmp_path / "src")
    files = sorted(folder.rglob("img*"))
    rows = [{"path": str(f.relative_to(tmp_path)), "label": f.parent.name, "photographer": f"p{i}"}
            for i, f in enumerate(files)]  # fmt: skip
    manifest = tmp_path / f"list.{kind}"
    if kind == "csv":
        with manifest.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "label", "photographer"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        manifest.write_text("\n".join(json.dumps(r) for r in rows))
    classes, items = items_from_manifest(manifest)
    assert classes == ["class_0", "class_1"]
    index, _ = write(items, tmp_path / "out", classes=classes)
    records = list(wds.WebDataset(index.urls, shardshuffle=False).decode("pil"))
    assert sorted(r["cls"] for r in records) == [0] * 5 + [1] * 3
    assert {r["json"]["photographer"] for r in records} == {f"p{i}" for i in range(8)}


def test_manifest_without_label_names_the_line(tmp_path):
    manifest = tmp_path / "list.jsonl"
    manifest.write_text('{"path": "a.jpg", "label": 1}\n{"path": "b.jpg"}\n')
    with pytest.raises(ValueError, match=r"list.jsonl:2: a row needs"):
        items_from_manifest(manifest)


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="mixer shards write"):
        read_index(tmp_path)


def test_cli_shards_write_and_index(tmp_path):
    src = make_folder(tmp_path / "src")
    result = run_mixer("shards", "write", str(src), str(tmp_path / "out"), "--max-count", "4", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "wrote 8 samples of 2 classes in 2 shards" in result.stdout
    assert read_index(tmp_path / "out").counts == (4, 4)
    # `shards index` counts shards of any writer; here the same tars, indexed into another file
    result = run_mixer("shards", "index", str(tmp_path / "out"), "--out", str(tmp_path / "again.json"))
    assert result.returncode == 0, result.stderr
    again = json.loads((tmp_path / "again.json").read_text())
    assert [s["num_samples"] for s in again["shards"]] == [4, 4]


def test_image_bytes_are_stored_unchanged(tmp_path):
    classes, items = items_from_folder(make_folder(tmp_path / "src", per_class=(1,)))
    index, _ = write(items, tmp_path / "out", classes=classes)
    with tarfile.open(index.urls[0]) as tar:
        stored = tar.extractfile("000000000.jpg").read()
    assert stored == Path(items[0].source).read_bytes()
    assert Image.open(io.BytesIO(stored)).format == "JPEG"
