import json

import torch

from pipeline.bench import ALL_VARIANTS, DEFAULT_VARIANTS, JAX, EndToEnd, _builders, shard_batches, standardised
from pipeline.models.mixer import MixerSpec
from tests.conftest import run_mixer


def test_every_listed_variant_has_a_builder():
    """`mixer bench train` (GPU only) looks variants up by name: a renamed one would fail only on the card."""
    names = _builders(MixerSpec(2, 4, 16, 8, 32, 16), 8, {}, "exact")
    assert set(ALL_VARIANTS) | set(DEFAULT_VARIANTS) <= set(names) | {JAX}  # the JAX/Flax peer runs apart
    assert "ours DeepSpeed ZeRO-1 + compile (autocast, stacked)" in names


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


def test_bench_remat_reports_the_activation_memory_of_each_setting(tmp_path):
    """`mixer bench remat` on the CPU: recomputing more keeps less per image, and recomputing also drops the bf16
    copies of the weights that autocast keeps (they are cast again in the backward pass)."""
    result = run_mixer("bench", "remat", "--model", "S/32", "--json", str(tmp_path / "remat.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["remat"]: r for r in json.loads((tmp_path / "remat.json").read_text())["rows"]}
    assert rows["blocks"]["mib_per_image"] < rows["matmuls"]["mib_per_image"] < rows["none"]["mib_per_image"]
    assert rows["matmuls"]["fixed_mib"] < rows["none"]["fixed_mib"]
    assert "kept for the backward pass" in result.stdout
