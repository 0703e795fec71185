"""Batched random augmentation of images or patches on their device, built from a config.

Two backends draw the same transforms (resized crop, rotation, colour jitter, grayscale): ``fused``
(default) is one affine warp and one colour matrix per sample, a handful of tensor ops for the
whole batch (on the CPU, :meth:`Augmentation.cut` crops and augments in one pass of a C kernel);
``kornia`` is the equivalent ``kornia.augmentation`` pipeline (HSV hue, random order
of the colour steps), ~20x slower on 7x7 patches, kept as the reference and for extending."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .errors import ConfigError
from .patches import PatchIndex, crop

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
    grayscale (probability ``grayscale_p``). Draws come from torch's global generator (on the CPU
    through a generator it seeds), so ``torch.manual_seed`` makes them repeatable. Works on 7 x 7
    patches and whole images alike.

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
        # A hue rotation by angle t is yiq^-1 R(t) yiq = keep + cos(t) cos_part + sin(t) sin_part;
        # colour_basis holds keep, cos_part, sin_part and G (a pixel to its gray level), flattened.
        yiq = torch.tensor(_YIQ)
        inverse = torch.linalg.inv(yiq)
        plane = torch.tensor([[0.0, 0, 0], [0, 1, 0], [0, 0, 1]])
        turn = torch.tensor([[0.0, 0, 0], [0, 0, -1], [0, 1, 0]])
        parts = [inverse @ middle @ yiq for middle in (torch.eye(3) - plane, plane, turn)]
        to_gray = torch.tensor(_LUMA).expand(3, 3)
        self.register_buffer("colour_basis", torch.stack([*parts, to_gray]).view(4, 9), persistent=False)
        self.register_buffer("luma", torch.tensor(_LUMA), persistent=False)
        # what the C kernel of :meth:`cut` reads: the config's numbers, then the colour basis
        numbers = [*config.crop_scale, config.rotation_degrees * math.pi / 180, config.rotation_p, config.jitter,
                   2 * math.pi * config.hue, config.jitter_p, config.grayscale_p]
        self.register_buffer("kernel_settings", torch.cat([torch.tensor(numbers), self.colour_basis.flatten()]),
                             persistent=False)
        self._grid_bases: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, columns: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Augment ``x``; ``columns`` = (global batch size, which of its samples ``x`` holds) draws
        the global batch's numbers and keeps this slice's (a data-parallel rank's share)."""
        n = x.shape[0]
        if self.geometric:
            x = F.grid_sample(x, self._grid(self._theta(self._draw(n, x.device, columns)), x), padding_mode="border",
                              align_corners=False)
        if self.colour:
            matrix, contrast = self._colour_matrix(self._draw(n, x.device, columns))
            offset = contrast * (x.mean(dim=(2, 3)) @ self.luma)
            x = torch.baddbmm(offset.view(n, 1, 1), matrix, x.flatten(2)).view_as(x).clamp_(0, 1)
        return x

    def cut(self, frames: torch.Tensor, where: PatchIndex, size: int,
            columns: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
        """The ``size`` x ``size`` patches of uint8 ``frames`` (N x C x H x W) at ``where``,
        augmented: ``self(to_float(crop(frames, where, size)), columns)``, the same draws and values
        (to float rounding). On the CPU, with channels_last frames, one pass of a C kernel
        (:mod:`contrastive_lw.native`): sampler included, 2.4x faster on 7 x 7 patches, 3x on 13 x 13."""
        applies = _kernel_applies(frames, self.kernel_settings) and len(where.image)
        kernel = native.cut_and_augment_kernel() if applies else None
        if kernel is None:
            return self(to_float(crop(frames, where, size)), columns)
        n, (count, channels, height, width) = len(where.image), frames.shape
        image, top, left = (index.to("cpu", torch.int64).contiguous() for index in where)
        if not all(_within(index, bound) for index, bound in zip((image, top, left),
                                                                 (count - 1, height - size, width - size))):
            raise ValueError(f"patch positions out of range for {size} x {size} patches of {height} x {width} images")
        geometry = self._draw(n, frames.device, columns) if self.geometric else None
        colour = self._draw(n, frames.device, columns) if self.colour else None
        out = torch.empty(n, size, size, channels)
        status = kernel(frames.data_ptr(), height, width, channels, image.data_ptr(), top.data_ptr(), left.data_ptr(),
                        n, size, _pointer(geometry), _pointer(colour), self.kernel_settings.data_ptr(),
                        torch.get_num_threads(), out.data_ptr())
        native.check(status, "the augmentation")
        return out.permute(0, 3, 1, 2)

    @staticmethod
    def _draw(n: int, device: torch.device, columns: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
        """The 6 x n uniform draws of one step (geometry or colour): :func:`counter_uniform` of a
        seed from torch's global generator, so ``torch.manual_seed`` repeats them, and the same
        numbers come with or without the C kernel. With ``columns`` (global size, indices) the
        global batch's draws are made and these columns kept."""
        seed = int(torch.randint(0, 2 ** 62, ()))
        if columns is None:
            return counter_uniform(seed, 6 * n, device).view(n, 6).T.contiguous()
        total, index = columns
        return counter_uniform(seed, 6 * total, device).view(total, 6).T[:, index.to(device)].contiguous()

    def _theta(self, uniform: torch.Tensor) -> torch.Tensor:
        """B x 6 (width cos, width sin, -height sin, height cos, cx, cy) of a random resized crop
        composed with a rotation: source (x, y) = u * (width cos, width sin) + v * (-height sin,
        height cos) + (cx, cy) for output (u, v) in [-1, 1]."""
        cfg = self.config
        area, log_ratio, cx, cy, angle, rotate = uniform
        area = area * (cfg.crop_scale[1] - cfg.crop_scale[0]) + cfg.crop_scale[0]
        ratio = (log_ratio * math.log(16 / 9) + math.log(3 / 4)).exp()
        width, height = (area * ratio).sqrt(), (area / ratio).sqrt()
        fits = (width <= 1) & (height <= 1)  # else the whole image, as torchvision falls back to
        width, height = width.where(fits, 1.0), height.where(fits, 1.0)
        cx, cy = (cx * 2 - 1) * (1 - width), (cy * 2 - 1) * (1 - height)
        angle = (angle * 2 - 1) * (rotate < cfg.rotation_p) * (cfg.rotation_degrees * math.pi / 180)
        cos, sin = angle.cos(), angle.sin()
        return torch.stack([width * cos, width * sin, -height * sin, height * cos, cx, cy], 1)

    def _grid(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Sampling grid B x S x S x 2 of the warps ``theta``: one matmul of the B x 6 coefficients
        with a constant 6 x 2S^2 basis, which leaves the grid contiguous (grid_sample is ~3x slower
        on a strided one)."""
        size = x.shape[-1]
        return (theta @ self._grid_basis(size, x)).view(len(theta), size, size, 2)

    def _grid_basis(self, size: int, like: torch.Tensor) -> torch.Tensor:
        """6 x 2S^2: row (k, j) holds coordinate k of (u, v, 1) at each output pixel in column j."""
        key = (size, like.device, like.dtype)
        if key not in self._grid_bases:
            u = (torch.arange(size, dtype=like.dtype) * 2 + 1) / size - 1
            uv1 = torch.stack([*torch.meshgrid(u, u, indexing="xy"), torch.ones(size, size, dtype=like.dtype)])
            basis = torch.einsum("kp,jl->kjpl", uv1.view(3, -1), torch.eye(2, dtype=like.dtype)).reshape(6, -1)
            self._grid_bases[key] = basis.to(like.device)
        return self._grid_bases[key]

    def _colour_matrix(self, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample colour matrix B x 3 x 3 and contrast coefficient B: y = matrix @ x + offset,
        offset = coefficient x the mean gray level of x.

        brightness b, contrast c, saturation s, hue h and grayscale compose (in that order) to
        ``b c (s H + (1 - s) G)`` (grayscale: ``b c G``), G mapping a pixel to its gray level,
        because hue keeps gray and luma fixed; contrast's pull towards the mean gray level is the
        offset."""
        cfg, n = self.config, uniform.shape[1]
        on, *factors, turn, keep_colour = uniform
        on = on < cfg.jitter_p
        brightness, contrast, saturation = (torch.stack(factors) * (2 * cfg.jitter) + (1 - cfg.jitter)).where(on, 1.0)
        turn = (turn * 2 - 1) * on * (2 * math.pi * cfg.hue)
        saturation = saturation * (keep_colour >= cfg.grayscale_p)  # grayscale is saturation 0
        # matrix = b c (s keep + s cos(h) cos_part + s sin(h) sin_part + (1 - s) G): one matmul
        weights = torch.stack([saturation, saturation * turn.cos(), saturation * turn.sin(), 1 - saturation], 1)
        matrix = ((weights * (brightness * contrast).view(n, 1)) @ self.colour_basis).view(n, 3, 3)
        return matrix, (1 - contrast) * brightness


_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def counter_uniform(seed: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``count`` floats in [0, 1): draw j is the top 24 bits of splitmix64(seed + (j + 1) x golden
    ratio), / 2^24, so each depends on its index alone. On the CPU the C kernel ``csrc/uniform.c``
    computes them in parallel where it builds; elsewhere the same integer arithmetic in PyTorch
    gives the same numbers bit for bit (tested), so a seed decides a run with or without a compiler.

    Example:
        >>> counter_uniform(7, 3).shape
        torch.Size([3])
    """
    kernel = native.uniform_kernel() if torch.device(device).type == "cpu" else None
    if kernel is not None:
        out = torch.empty(count)
        kernel(seed, count, out.data_ptr())
        return out
    signed = lambda value: value - (1 << 64) if value >= 1 << 63 else value  # noqa: E731  (int64 wraps)
    z = torch.arange(1, count + 1, dtype=torch.int64, device=device) * signed(_GOLDEN) + signed(seed % (1 << 64))
    z = (z ^ _logical_shift(z, 30)) * signed(_MIX1)
    z = (z ^ _logical_shift(z, 27)) * signed(_MIX2)
    z = z ^ _logical_shift(z, 31)
    return _logical_shift(z, 40).float() * (1.0 / 16777216)


def _logical_shift(z: torch.Tensor, bits: int) -> torch.Tensor:
    """``z >> bits`` of int64 read as unsigned (torch's shift of int64 keeps the sign)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _kernel_applies(frames: torch.Tensor, settings: torch.Tensor) -> bool:
    """Whether the C kernel takes these frames (uint8 channels_last on the CPU, up to 4 channels)
    and settings (float32 on the CPU: not moved by ``.to``)."""
    return (frames.device.type == settings.device.type == "cpu" and frames.dtype == torch.uint8
            and settings.dtype == torch.float32 and frames.dim() == 4 and frames.shape[1] <= 4
            and frames.is_contiguous(memory_format=torch.channels_last))


def _within(index: torch.Tensor, high: int) -> bool:
    smallest, largest = torch.aminmax(index)
    return 0 <= int(smallest) and int(largest) <= high


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


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
