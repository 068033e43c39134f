from collections import Counter

import torch

from pipeline.data import synthetic
from pipeline.data.transforms import decode


def test_generation_is_reproducible_and_covers_every_class():
    a = list(synthetic.generate("shapes", 80, 16, seed=1))
    b = list(synthetic.generate("shapes", 80, 16, seed=1))
    c = list(synthetic.generate("shapes", 80, 16, seed=2))
    assert [s.image for s in a] == [s.image for s in b]
    assert [s.image for s in a] != [s.image for s in c]
    assert set(Counter(s.label for s in a)) == set(range(len(synthetic.SHAPE_SETS["shapes"])))


def test_images_decode_to_the_requested_size():
    sample = next(synthetic.generate("novel-shapes", 1, 24, seed=0))
    image = decode(sample.image)
    assert image.shape == (3, 24, 24) and image.dtype == torch.uint8
