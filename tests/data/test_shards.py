import io
import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from pipeline.data.shards import read_index, samples_from_folder, write_shards
from tests.conftest import run_mixer


def make_folder(root, per_class=(5, 3)):
    for c, n in enumerate(per_class):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (20, 10), (40 * c, 10 * i, 0)).save(d / f"img{i}.{'png' if i % 2 else 'jpeg'}")
    return root


def test_folder_to_shards_with_count_limit(tmp_path):
    classes, files, samples = samples_from_folder(make_folder(tmp_path / "src"))
    index = write_shards(samples, tmp_path / "out", classes=classes, max_count=3, progress=False)
    assert classes == ["class_0", "class_1"] and len(files) == 8
    assert index.counts == (3, 3, 2) and index.num_samples == 8
    assert read_index(tmp_path / "out") == index
    # Plain tar tools see three members per sample.
    with tarfile.open(index.urls[0]) as tar:
        names = tar.getnames()
    assert sorted(names[:3]) == ["00000000.cls", "00000000.jpg", "00000000.json"]


def test_shards_are_readable_by_plain_webdataset(tmp_path):
    classes, _, samples = samples_from_folder(make_folder(tmp_path / "src"))
    index = write_shards(samples, tmp_path / "out", classes=classes, max_count=100, progress=False)
    records = list(wds.WebDataset(index.urls, shardshuffle=False).decode("pil"))
    assert len(records) == 8
    labels = sorted(r["cls"] for r in records)
    assert labels == [0] * 5 + [1] * 3
    png = next(r for r in records if "png" in r)
    assert png["png"].size == (20, 10)
    assert json.loads(json.dumps(png["json"]))["class"] in classes


def test_size_limit_splits_shards(tmp_path):
    classes, _, samples = samples_from_folder(make_folder(tmp_path / "src", per_class=(10, 10)))
    index = write_shards(samples, tmp_path / "out", classes=classes, max_bytes=2500, progress=False)
    assert len(index.shards) > 2 and index.num_samples == 20


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="mixer shards write"):
        read_index(tmp_path)


def test_cli_shards_write(tmp_path):
    src = make_folder(tmp_path / "src")
    result = run_mixer("shards", "write", str(src), str(tmp_path / "out"), "--max-count", "4")
    assert result.returncode == 0, result.stderr
    assert "wrote 8 samples of 2 classes in 2 shards" in result.stdout
    assert read_index(tmp_path / "out").counts == (4, 4)


def test_image_bytes_are_stored_unchanged(tmp_path):
    classes, files, samples = samples_from_folder(make_folder(tmp_path / "src", per_class=(1,)))
    index = write_shards(samples, tmp_path / "out", classes=classes, progress=False)
    with tarfile.open(index.urls[0]) as tar:
        stored = tar.extractfile("00000000.jpg").read()
    assert stored == files[0].read_bytes()
    assert Image.open(io.BytesIO(stored)).format == "JPEG"
