"""Batched random augmentation of images or patches on their device, built from a config.

Two backends draw the same transforms (resized crop, rotation, colour jitter, grayscale): ``fused``
(default) is one affine warp and one colour matrix per sample, a handful of tensor ops for the
whole batch; ``kornia`` is the equivalent ``kornia.augmentation`` pipeline (HSV hue, random order
of the colour steps), ~20x slower on 7x7 patches, kept as the reference and for extending."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

# ITU-R 601 luma weights and the RGB -> YIQ matrix (hue = a rotation of the I, Q plane).
_LUMA = (0.299, 0.587, 0.114)
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
BACKENDS = ("fused", "kornia")


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
    backend: str = "fused"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"augment.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"augment.crop_scale must be two numbers 0 < lo <= hi <= 1, got {self.crop_scale}")
        for name in ("rotation_p", "jitter_p", "grayscale_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"augment.{name} must be a probability in [0, 1]")
        if self.jitter < 0 or not 0 <= self.hue <= 0.5 or self.rotation_degrees < 0:
            raise ConfigError("augment.jitter and rotation_degrees must be >= 0, augment.hue in [0, 0.5]")


class Augmentation(nn.Module):
    """Random augmentation of float images B x C x S x S in [0, 1], each sample with its own draw.

    Geometry (one bilinear ``grid_sample`` for the batch, borders replicated): a random resized
    crop (area fraction in ``crop_scale``, aspect ratio 3/4..4/3) composed with a rotation of
    up to ``rotation_degrees`` (probability ``rotation_p``). Colour (RGB only; one 3 x 3 matrix and
    an offset per sample, one batched matmul): brightness, contrast and saturation factors in
    ``1 +- jitter`` and a hue rotation of up to ``hue`` turns (probability ``jitter_p``), then
    grayscale (probability ``grayscale_p``). Draws use torch's global generator, so
    ``torch.manual_seed`` makes them repeatable. Works on 7 x 7 patches and whole images alike.

    Example:
        >>> augment = Augmentation(AugmentConfig())
        >>> augment(torch.rand(8, 3, 7, 7)).shape
        torch.Size([8, 3, 7, 7])
    """

    def __init__(self, config: AugmentConfig, channels: int = 3) -> None:
        super().__init__()
        self.config = config
        self.geometric = config.crop_scale != (1.0, 1.0) or bool(config.rotation_degrees and config.rotation_p)
        self.colour = channels == 3 and bool(config.jitter_p and (config.jitter or config.hue) or config.grayscale_p)
        # A hue rotation by angle t is yiq^-1 R(t) yiq = keep + cos(t) cos_part + sin(t) sin_part.
        yiq = torch.tensor(_YIQ)
        inverse = torch.linalg.inv(yiq)
        plane = torch.tensor([[0.0, 0, 0], [0, 1, 0], [0, 0, 1]])
        turn = torch.tensor([[0.0, 0, 0], [0, 0, -1], [0, 1, 0]])
        for name, middle in (("keep", torch.eye(3) - plane), ("cos_part", plane), ("sin_part", turn)):
            self.register_buffer(name, inverse @ middle @ yiq, persistent=False)
        self.register_buffer("luma", torch.tensor(_LUMA), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.geometric:
            x = F.grid_sample(x, self._grid(x), padding_mode="border", align_corners=False)
        if self.colour:
            matrix, offset = self._colour(x)
            x = torch.baddbmm(offset, matrix, x.flatten(2)).view_as(x).clamp_(0, 1)
        return x

    def _uniform(self, n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
        return torch.rand(n, device=device) * (high - low) + low

    def _grid(self, x: torch.Tensor) -> torch.Tensor:
        """Sampling grid B x S x S x 2 of a random resized crop composed with a rotation."""
        cfg, n, size, device = self.config, x.shape[0], x.shape[-1], x.device
        area = self._uniform(n, *cfg.crop_scale, device)
        ratio = self._uniform(n, math.log(3 / 4), math.log(4 / 3), device).exp()
        width, height = (area * ratio).sqrt(), (area / ratio).sqrt()
        fits = (width <= 1) & (height <= 1)  # else the whole image, as torchvision falls back to
        width, height = width.where(fits, 1.0), height.where(fits, 1.0)
        cx, cy = (torch.rand(2, n, device=device) * 2 - 1) * torch.stack([1 - width, 1 - height])
        angle = self._uniform(n, -cfg.rotation_degrees, cfg.rotation_degrees, device) * (math.pi / 180)
        angle = angle * (torch.rand(n, device=device) < cfg.rotation_p)
        cos, sin = angle.cos(), angle.sin()
        # output (u, v, 1), u and v in [-1, 1] -> source theta (u, v, 1): rotation . scale, then shift
        theta = torch.stack([width * cos, width * sin, -height * sin, height * cos, cx, cy], 1)
        theta = theta.view(n, 3, 2).transpose(0, 1).reshape(3, 2 * n)
        u = (torch.arange(size, device=device, dtype=x.dtype) * 2 + 1) / size - 1
        uv1 = torch.stack([*torch.meshgrid(u, u, indexing="xy"), torch.ones(size, size, device=device)], -1)
        return (uv1.view(size * size, 3) @ theta).view(size, size, n, 2).permute(2, 0, 1, 3)

    def _colour(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample colour matrix B x 3 x 3 and offset B x 1 x 1: y = matrix @ x + offset.

        brightness b, contrast c, saturation s, hue h and grayscale compose (in that order) to
        ``b c (s H + (1 - s) G)`` (grayscale: ``b c G``), G mapping a pixel to its gray level,
        because hue keeps gray and luma fixed; contrast's pull towards the mean gray level is the
        offset."""
        cfg, n, device = self.config, x.shape[0], x.device
        on = torch.rand(n, device=device) < cfg.jitter_p
        brightness, contrast, saturation = (
            torch.where(on, self._uniform(n, 1 - cfg.jitter, 1 + cfg.jitter, device), 1.0).view(n, 1, 1)
            for _ in range(3))
        turn = torch.where(on, self._uniform(n, -cfg.hue, cfg.hue, device), 0.0).view(n, 1, 1) * (2 * math.pi)
        to_gray = self.luma.expand(3, 3)
        hue = self.keep + turn.cos() * self.cos_part + turn.sin() * self.sin_part
        matrix = saturation * hue + (1 - saturation) * to_gray
        gray = (torch.rand(n, device=device) < cfg.grayscale_p).view(n, 1, 1)
        matrix = torch.where(gray, to_gray, matrix) * (brightness * contrast)
        mean_gray = (x.mean(dim=(2, 3)) @ self.luma).view(n, 1, 1)
        return matrix, (1 - contrast) * brightness * mean_gray


class KorniaAugmentation(nn.Module):
    """The same augmentations as :class:`Augmentation` with ``kornia.augmentation`` (one pipeline
    per input size, built on first use)."""

    def __init__(self, config: AugmentConfig, channels: int = 3) -> None:
        super().__init__()
        self.config, self.channels = config, channels
        self._pipelines: dict[int, nn.Module] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        if size not in self._pipelines:
            self._pipelines[size] = self._build(size)
        return self._pipelines[size](x)

    def _build(self, size: int) -> nn.Module:
        import kornia.augmentation as K

        cfg, steps = self.config, []
        if cfg.crop_scale != (1.0, 1.0):
            # "resample" crops are ~10x faster than kornia's default slicing on small patches.
            steps.append(K.RandomResizedCrop((size, size), scale=cfg.crop_scale, cropping_mode="resample"))
        if cfg.rotation_degrees and cfg.rotation_p:
            steps.append(K.RandomRotation(cfg.rotation_degrees, p=cfg.rotation_p))
        if self.channels == 3 and cfg.jitter_p and (cfg.jitter or cfg.hue):
            steps.append(K.ColorJitter(cfg.jitter, cfg.jitter, cfg.jitter, cfg.hue, p=cfg.jitter_p))
        if self.channels == 3 and cfg.grayscale_p:
            steps.append(K.RandomGrayscale(p=cfg.grayscale_p))
        return K.AugmentationSequential(*steps) if steps else nn.Identity()


def build_augmentation(config: AugmentConfig, channels: int = 3) -> nn.Module:
    """A module mapping float images or patches B x C x S x S in [0, 1] to augmented ones, each
    sample with its own draw from torch's global generator (``config.backend`` picks the
    implementation; the identity when ``config.enabled`` is false). Colour steps apply to RGB only."""
    if not config.enabled:
        return nn.Identity()
    backend = Augmentation if config.backend == "fused" else KorniaAugmentation
    return backend(config, channels)


def to_float(patches: torch.Tensor) -> torch.Tensor:
    """uint8 patches to float in [0, 1]."""
    return patches.float().div_(255)
