import re

import pytest
import torch

from pipeline.bench.train import DEFAULT, KNOWN, REGISTRY, SURVEY, EndToEnd, shard_batches, standardised, variants_named
from pipeline.models.mixer import MixerSpec
from tests.conftest import REPO


def test_every_listed_variant_has_a_builder():
    """`mixer bench train` (GPU only) looks variants up by name: a renamed one would fail only on the card."""
    names = REGISTRY
    assert {v.name for v in SURVEY + DEFAULT} <= set(names)
    assert "ours DeepSpeed ZeRO-1 + compile (autocast, stacked)" in names
    assert len({v.name for v in set(KNOWN)}) == len(set(KNOWN))  # no two variants share a name
    assert variants_named(["all"]) == SURVEY and variants_named(None) == DEFAULT
    with pytest.raises(ValueError, match="unknown variant"):
        variants_named(["ours DeepSpeed ZeRO-4"])


def test_every_variant_named_in_the_docs_is_known():
    """The measurements in README and docs/BENCHMARKS.md give their commands: each `--variants` name must still
    resolve, so that every command there can be run again."""
    text = " ".join((REPO / doc).read_text() for doc in ("README.md", "docs/BENCHMARKS.md"))
    text = re.sub(r"\s*\n\s*", " ", text)  # a command quoted in Markdown may wrap across lines
    named = {n for m in re.finditer(r'--variants((?:\s+"[^"]+")+)', text) for n in re.findall(r'"([^"]+)"', m[1])}
    assert len(named) > 10 and named - set(REGISTRY) == set()


def test_end_to_end_batches_come_from_generated_jpeg_shards(tmp_path, monkeypatch):
    """`mixer bench train --end-to-end` feeds the step through the training loader's GPU path; here on the CPU."""
    monkeypatch.setenv("MIXER_BENCH_CACHE", str(tmp_path))
    spec = MixerSpec(2, 16, 32, 16, 64, 224)
    stream = shard_batches(spec, 8, EndToEnd(workers=1, generate=40), torch.device("cpu"))
    try:
        batches = standardised(stream)
        for _ in range(3):
            images, labels = batches()
            assert images.shape == (8, 3, 224, 224) and images.dtype == torch.float32 and labels.shape == (8,)
            assert -3 < images.mean() < 3 and images.std() > 0.1  # standardised pixels, not raw 0-255
    finally:
        stream.close()
    assert (tmp_path / "mixer-bench-photos-40" / "index.json").exists()
