"""Batched augmentation of patches on their device (kornia), built from a config."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class AugmentConfig:
    """Per-sample random augmentations; a probability or strength of 0 switches one off."""

    enabled: bool = True
    crop_scale: tuple[float, ...] = (0.6, 1.0)
    rotation_degrees: float = 15.0
    rotation_p: float = 0.5
    jitter: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2

    def __post_init__(self) -> None:
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"augment.crop_scale must be two numbers 0 < lo <= hi <= 1, got {self.crop_scale}")
        for name in ("rotation_p", "jitter_p", "grayscale_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"augment.{name} must be a probability in [0, 1]")
        if self.jitter < 0 or not 0 <= self.hue <= 0.5 or self.rotation_degrees < 0:
            raise ConfigError("augment.jitter and rotation_degrees must be >= 0, augment.hue in [0, 0.5]")


def build_augmentation(config: AugmentConfig, size: int, channels: int = 3) -> nn.Module:
    """A module mapping float patches B x C x size x size in [0, 1] to augmented ones, each sample
    with its own random parameters. Colour steps apply to RGB input only."""
    if not config.enabled:
        return nn.Identity()
    import kornia.augmentation as K

    steps: list[nn.Module] = []
    if config.crop_scale != (1.0, 1.0):
        # "resample" crops are ~10x faster than kornia's default slicing on small patches.
        steps.append(K.RandomResizedCrop((size, size), scale=config.crop_scale, cropping_mode="resample"))
    if config.rotation_degrees and config.rotation_p:
        steps.append(K.RandomRotation(config.rotation_degrees, p=config.rotation_p))
    if channels == 3 and config.jitter_p and (config.jitter or config.hue):
        steps.append(K.ColorJitter(config.jitter, config.jitter, config.jitter, config.hue, p=config.jitter_p))
    if channels == 3 and config.grayscale_p:
        steps.append(K.RandomGrayscale(p=config.grayscale_p))
    return K.AugmentationSequential(*steps) if steps else nn.Identity()


def to_float(patches: torch.Tensor) -> torch.Tensor:
    """uint8 patches to float in [0, 1]."""
    return patches.float().div_(255)
