"""Augmentation and normalisation on uint8 batches, on the training device.

Whole batches are cropped and flipped with tensor indexing: no per-image PIL work in the
training loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from learner.core.config import AugmentConfig


def random_crop_flip(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """Zero-pad by ``pad``, take a random ``crop`` x ``crop`` window per image, flip half."""
    b, _, h, w = images.shape
    device = images.device
    if config.pad:
        images = F.pad(images, (config.pad,) * 4)
        h, w = h + 2 * config.pad, w + 2 * config.pad
    crop = config.crop
    if h < crop or w < crop:
        raise ValueError(f"images of {h}x{w} (padded) are smaller than the crop {crop}")
    oy = torch.randint(0, h - crop + 1, (b, 1), generator=generator, device=device)
    ox = torch.randint(0, w - crop + 1, (b, 1), generator=generator, device=device)
    span = torch.arange(crop, device=device)
    rows = (oy + span)[:, :, None]
    cols = (ox + span)[:, None, :]
    if config.flip:
        flip = torch.rand(b, generator=generator, device=device) < 0.5
        cols = torch.where(
            flip[:, None, None], ox[:, :, None] + crop - 1 - span[None, None, :], cols
        )
    batch = torch.arange(b, device=device)[:, None, None]
    # Advanced indexing puts the indexed dims first: (B, crop, crop, C).
    return images[batch, :, rows, cols].permute(0, 3, 1, 2)


def center_crop(images: torch.Tensor, crop: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    if h == crop and w == crop:
        return images
    top, left = (h - crop) // 2, (w - crop) // 2
    return images[..., top : top + crop, left : left + crop]


class Normalizer:
    """uint8 -> normalised float, in the memory layout the model trains fastest with."""

    def __init__(self, config: AugmentConfig, device: torch.device, channels_last: bool) -> None:
        channels = len(config.mean)
        self.scale = (1.0 / (255.0 * torch.tensor(config.std, device=device))).view(
            1, channels, 1, 1
        )
        self.shift = (
            -torch.tensor(config.mean, device=device) / torch.tensor(config.std, device=device)
        ).view(1, channels, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, images.to(self.scale.dtype), self.scale)
        return x.contiguous(memory_format=self.memory_format)
