from pipeline.bench import ALL_VARIANTS, DEFAULT_VARIANTS, _builders
from pipeline.models.mixer import MixerSpec


def test_every_listed_variant_has_a_builder():
    """`mixer bench train` (GPU only) looks variants up by name: a renamed one would fail only on the card."""
    names = _builders(MixerSpec(2, 4, 16, 8, 32, 16), 8, {}, "exact")
    assert set(ALL_VARIANTS) | set(DEFAULT_VARIANTS) <= set(names)
    assert "ours DeepSpeed ZeRO-1 + compile (autocast, stacked)" in names
