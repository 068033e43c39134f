from dataclasses import replace

import pytest
import torch
from torchvision.transforms import v2

from pipeline.config import AugmentConfig
from pipeline.data.transforms import normalize, stack_images, train_transform


def photo(height: int, width: int, seed: int) -> torch.Tensor:
    """A smooth uint8 image with detail at several scales, so crops and resizes differ visibly."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 16 + 1, width // 16 + 1, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    noise = torch.rand(1, 3, height, width, generator=g) * 0.2
    return ((smooth + noise).clamp(0, 1)[0] * 255).round().to(torch.uint8)


def v2_reference(cfg: AugmentConfig, size: int) -> v2.Compose:
    """The training augmentation spelled with the plain transforms v2 classes."""
    steps = [
        v2.RandomResizedCrop(size, scale=cfg.crop_scale, antialias=True)
        if cfg.crop == "inception"
        else v2.Resize((size, size), antialias=True)
    ]
    if cfg.flip:
        steps.append(v2.RandomHorizontalFlip())
    if cfg.randaugment_magnitude > 0:
        steps.append(v2.RandAugment(num_ops=2, magnitude=cfg.randaugment_magnitude))
    return v2.Compose(steps)


@pytest.mark.parametrize(
    "cfg",
    [
        AugmentConfig(),
        AugmentConfig(crop="resize"),
        AugmentConfig(flip=False, crop_scale=(0.5, 1.0)),
        AugmentConfig(randaugment_magnitude=15),
    ],
    ids=["inception", "resize", "no-flip", "randaugment"],
)
def test_train_transform_draws_and_pixels_match_transforms_v2(cfg):
    ours, reference = train_transform(cfg, 64), v2_reference(cfg, 64)
    unflipped = train_transform(replace(cfg, flip=False), 64)
    flipped = 0
    for seed in range(24):
        image = photo(90 + seed, 120 - seed, seed)
        torch.manual_seed(seed)
        expected = reference(image)
        torch.manual_seed(seed)
        got = ours(image)
        assert got.dtype == torch.uint8 and got.shape == (3, 64, 64)
        assert torch.equal(got, expected), f"seed {seed}"
        torch.manual_seed(seed)
        flipped += not torch.equal(got, unflipped(image))
    if cfg.flip and cfg.randaugment_magnitude == 0:
        assert 4 <= flipped <= 20  # about half the images flip


def test_stack_images_keeps_values_and_lays_the_batch_out_channels_last():
    cfg = AugmentConfig()
    transform = train_transform(cfg, 32)
    images = [transform(photo(60, 80, seed)) for seed in range(5)]
    batch = stack_images(images)
    assert batch.shape == (5, 3, 32, 32) and batch.dtype == torch.uint8
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack([image.contiguous() for image in images]))
    standardised = normalize(batch)
    assert torch.allclose(standardised, normalize(batch.contiguous()))
    # Images laid out otherwise (after RandAugment, say) stack to the same values.
    assert torch.equal(stack_images([image.contiguous() for image in images]), batch)


def test_a_16_bit_png_decodes_to_8_bits():
    """`mixer shards write` keeps 16-bit PNGs; torchvision decodes them to uint16, which stopped training
    ("Promotion for uint16 ... not supported")."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.data.transforms import decode

    levels = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(levels).save(buf, "PNG")
    image = decode(buf.getvalue())
    assert image.dtype == torch.uint8 and image.shape == (3, 20, 30)
    assert torch.equal(image[0], torch.from_numpy((levels >> 8).astype(np.uint8)))  # the high byte
