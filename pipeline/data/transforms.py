"""Decoding and augmentation with torchvision (io.decode_image + transforms v2).

Loader workers stay in uint8 from decode to batch (a quarter of float32's bytes through the worker queues);
`normalize` turns batches into model input on the training device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as F

from pipeline.config import AugmentConfig

# ImageNet statistics, as the official Mixer input pipeline uses ([-1, 1] scaling would do as well).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def decode(data: bytes) -> torch.Tensor:
    """Encoded JPEG/PNG/WebP bytes -> (3, H, W) uint8, whatever the file's colour mode and bit depth (a 16-bit PNG
    decodes to uint16, which the uint8 augmentation and batches cannot take: it is scaled to 8 bits here)."""
    image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return image if image.dtype == torch.uint8 else F.to_dtype(image, torch.uint8, scale=True)


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> standardised `dtype` (floats pass through unchanged: mixed batches already are)."""
    if images.dtype != torch.uint8:
        return images.to(dtype)
    mean, inv_std = _statistics(images.device)
    return ((images.float() - mean) * inv_std).to(dtype)


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader's uint8 batch -> standardised float32 images and labels on `device` (mixup and the model's dtype
    come after)."""
    return normalize(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)


@functools.cache
def _statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and 1/std in uint8 units, made once per device: a host-to-GPU copy per batch would make
    the host wait for the GPU to drain every step."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    return mean.to(device), (1 / (torch.tensor(STD).view(1, 3, 1, 1) * 255)).to(device)


class CropFlip:
    """Inception crop (or a resize of the whole image) to `size`², then a random horizontal flip: one uint8
    (3, H, W) image in and out, through transforms v2's functional kernels.

    The same random draws, in the same order, as `v2.RandomResizedCrop` then `v2.RandomHorizontalFlip`, and the same
    pixels. It skips their per-call dispatch (~0.1 ms an image) and resizes the crop in channels-last order, which
    the uint8 antialiased kernel reads without repacking: together ~25% of the augmentation's time on one core."""

    def __init__(self, cfg: AugmentConfig, size: int) -> None:
        self.cfg, self.size = cfg, [size, size]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.cfg.crop == "inception":
            top, left, h, w = RandomResizedCrop.get_params(image, list(self.cfg.crop_scale), [3 / 4, 4 / 3])
            image = image[:, top : top + h, left : left + w]
        out = F.resize(image[None].contiguous(memory_format=torch.channels_last), self.size, antialias=True)[0]
        if self.cfg.flip and torch.rand(1) < 0.5:
            out = F.horizontal_flip(out)
        return out


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 (3, S, S) images -> one (B, 3, S, S) batch laid out channels-last, as `CropFlip` makes each image:
    stacking them is then a plain copy per image (into shared memory inside a loader worker), not a transpose.
    Channels-last batches stay so on the device; the model's patch stem reads either layout."""
    return torch.utils.data.default_collate([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)


def train_transform(cfg: AugmentConfig, image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The paper's training augmentation: inception crop, flip, optional RandAugment(2, m); uint8 in and out."""
    crop_flip = CropFlip(cfg, image_size)
    if cfg.randaugment_magnitude > 0:
        return v2.Compose([crop_flip, v2.RandAugment(num_ops=2, magnitude=cfg.randaugment_magnitude)])
    return crop_flip


def batch_transform(cfg: AugmentConfig, num_classes: int) -> v2.Transform | None:
    """Mixup / CutMix on whole batches (after collation): labels become (B, num_classes) probabilities."""
    mixers = []
    if cfg.mixup > 0:
        mixers.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix > 0:
        mixers.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def eval_transform(cfg: AugmentConfig, image_size: int) -> v2.Transform:
    """ "resize-crop": resize both sides, centre-crop; "resmall-crop": resize the short side, centre-crop."""
    side = round(image_size * cfg.eval_resize)
    resize = v2.Resize((side, side) if cfg.eval_crop == "resize-crop" else side, antialias=True)
    return v2.Compose([resize, v2.CenterCrop(image_size)])
