"""Decoding and augmentation with torchvision (io.decode_image + transforms v2).

Loader workers stay in uint8 from decode to batch (a quarter of float32's bytes through the worker queues);
`normalize` turns batches into model input on the training device.
"""

from __future__ import annotations

import functools

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from pipeline.config import AugmentConfig

# ImageNet statistics, as the official Mixer input pipeline uses ([-1, 1] scaling would do as well).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def decode(data: bytes) -> torch.Tensor:
    """Encoded JPEG/PNG/WebP bytes -> (3, H, W) uint8, whatever the file's colour mode."""
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> standardised `dtype` (floats pass through unchanged: mixed batches already are)."""
    if images.dtype != torch.uint8:
        return images.to(dtype)
    mean, inv_std = _statistics(images.device)
    return ((images.float() - mean) * inv_std).to(dtype)


@functools.cache
def _statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and 1/std in uint8 units, made once per device: a host-to-GPU copy per batch would make
    the host wait for the GPU to drain every step."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    return mean.to(device), (1 / (torch.tensor(STD).view(1, 3, 1, 1) * 255)).to(device)


def train_transform(cfg: AugmentConfig, image_size: int) -> v2.Transform:
    """The paper's training augmentation: inception crop, flip, optional RandAugment(2, m); uint8 in and out."""
    steps: list[v2.Transform] = []
    if cfg.crop == "inception":
        steps.append(v2.RandomResizedCrop(image_size, scale=cfg.crop_scale, antialias=True))
    else:
        steps.append(v2.Resize((image_size, image_size), antialias=True))
    if cfg.flip:
        steps.append(v2.RandomHorizontalFlip())
    if cfg.randaugment_magnitude > 0:
        steps.append(v2.RandAugment(num_ops=2, magnitude=cfg.randaugment_magnitude))
    return v2.Compose(steps)


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
