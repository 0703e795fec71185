"""The backbone: convolutional blocks and the layer-wise network with its receptive-field math."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .accel.conv import Conv2d, MatmulReluMaxPool
from .blocks import BlockNet
from .config import per_layer, to_dict
from .errors import ConfigError


@dataclass(frozen=True)
class ArchConfig:
    """Shape of a :class:`LayerwiseNet`. ``widths`` sets the number of blocks; the other
    per-block tuples repeat their last entry for deeper blocks.

    The default is the seed network with block 3 unpooled: block 1 = conv 6x6 -> ReLU -> max-pool 2x2
    (7x7 receptive field), block 2 = conv 3x3 -> BatchNorm -> ReLU -> max-pool 2x2 (13x13), block 3 =
    conv 3x3 -> BatchNorm -> ReLU (21x21). Block 3's map on 32x32 images is then 3x3 (the seed's pooled
    block 3, ``pools: [2]``, leaves 1x1 of it, for the same MACs); unpooled, its features read out
    ~8 points better alone and its frozen transfer far better (docs/STUDY.md, seventh round).
    ``pools`` entry 1 means no pooling (the paper's pooling ablation is ``pools: [1, 2]``).
    ``paddings``: zero padding on each side of a block's convolution (default 0, the seed's
    "valid" convolutions); padding keeps a larger map on whole images (``paddings: [0, 1]`` gives
    block 3 a 6x6 map on 32x32 images instead of 3x3) and leaves the receptive field unchanged.
    """

    in_channels: int = 3
    widths: tuple[int, ...] = (64, 128, 256)
    kernel_sizes: tuple[int, ...] = (6, 3)
    pools: tuple[int, ...] = (2, 2, 1)
    batch_norm: tuple[bool, ...] = (False, True)
    paddings: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        for name in ("widths", "kernel_sizes", "pools", "batch_norm", "paddings"):
            if len(getattr(self, name)) == 0:
                raise ConfigError(f"arch.{name} must hold at least one value")
        for name in ("in_channels", *self.widths, *self.kernel_sizes, *self.pools):
            value = self.in_channels if name == "in_channels" else name
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"arch sizes must be positive integers, got {value!r}")
        for k in range(1, self.num_blocks + 1):
            padding, kernel = per_layer(self.paddings, k), per_layer(self.kernel_sizes, k)
            if not isinstance(padding, int) or not 0 <= padding < kernel:
                raise ConfigError(f"arch.paddings: block {k}'s padding must be an integer in 0..{kernel - 1} "
                                  f"(its kernel is {kernel}), got {padding!r}")

    @property
    def num_blocks(self) -> int:
        return len(self.widths)

    def block(self, k: int) -> tuple[int, int, int, int, bool, int]:
        """(in_channels, out_channels, kernel, pool, batch_norm, padding) of block ``k`` (1-based)."""
        in_ch = self.in_channels if k == 1 else self.widths[k - 2]
        return (in_ch, self.widths[k - 1], per_layer(self.kernel_sizes, k),
                per_layer(self.pools, k), per_layer(self.batch_norm, k), per_layer(self.paddings, k))

    def truncated(self, k: int) -> ArchConfig:
        """The same architecture with only its first ``k`` blocks."""
        return dataclasses.replace(self, widths=self.widths[:k])

    def without_first_pool(self) -> ArchConfig:
        """The same architecture with block 1 unpooled (the paper's pooling ablation), the other
        blocks' pools kept (a single entry, which every block repeats, stays theirs)."""
        return dataclasses.replace(self, pools=(1, *(self.pools[1:] or self.pools)))


class ConvBlock(nn.Sequential):
    """conv (stride 1, ``padding`` zeros each side) -> [BatchNorm] -> ReLU -> [max-pool]. The forward pass pools
    before the ReLU: max-pool and ReLU commute, and the ReLU and its backward then run on the
    pooled map (the end-to-end pretraining step 1.04x faster, docs/PERFORMANCE.md)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 pool: int = 2, batch_norm: bool = False, padding: int = 0) -> None:
        layers: list[nn.Module] = [Conv2d(in_channels, out_channels, kernel_size, padding=padding,
                                          bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
        if pool > 1:
            layers.append(nn.MaxPool2d(pool))
        super().__init__(*layers)
        self.kernel_size, self.pool, self.padding = kernel_size, pool, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):
            return MatmulReluMaxPool.apply(x, self.conv.weight, self.conv.bias).view(x.shape[0], -1, 1, 1)
        x = self.pre_activation(x)
        if self.pool > 1:  # pool, then ReLU: the same map and gradient (ReLU is monotone), on a 4x smaller map
            x = self[-1](x)
        if x._base is not None and torch.is_grad_enabled():
            return F.relu(x)  # not in place on Conv2d's matmul-path view: its backward would copy the base
        return F.relu_(x)

    def _fused(self, x: torch.Tensor) -> bool:
        """Conv, ReLU and a pool over the whole (<= 2 x 2) convolution output run as one matmul and
        one max: the greedy first block at its receptive field."""
        return (not isinstance(self[1], nn.BatchNorm2d) and x.shape[-1] - self.kernel_size + 1 == self.pool
                and self.conv._as_matmul(x))

    @property
    def conv(self) -> Conv2d:
        return self[0]

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """The block's map before its ReLU (conv, and BatchNorm where it has one)."""
        for layer in self:
            if isinstance(layer, nn.ReLU):
                return x
            x = layer(x)
        raise AssertionError("a ConvBlock always holds a ReLU")


class LayerwiseNet(BlockNet):
    """A stack of :class:`ConvBlock` s trained one block at a time: the project's own backbone
    (``--backbone lw``), with the :class:`~contrastive_lw.blocks.BlockNet` interface.

    Example:
        >>> net = LayerwiseNet(ArchConfig())
        >>> [net.receptive_field(k) for k in (1, 2, 3)]
        [7, 13, 21]
        >>> net(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 256, 3, 3])
    """

    def __init__(self, arch: ArchConfig | None = None) -> None:
        super().__init__()
        self.arch = arch or ArchConfig()
        self.blocks = nn.Sequential(*(ConvBlock(*self.arch.block(k))
                                      for k in range(1, self.arch.num_blocks + 1)))
        self._init_normalization(self.arch.in_channels)

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": "lw", "arch": to_dict(self.arch)}

    def receptive_field(self, k: int | None = None) -> int:
        size, jump = 1, 1
        for block in self.blocks[: self._check_k(k)]:
            size += (block.kernel_size - 1) * jump
            size += (block.pool - 1) * jump
            jump *= block.pool
        return size

    def stride(self, k: int | None = None) -> int:
        return math.prod(block.pool for block in self.blocks[: self._check_k(k)])

    def output_size(self, input_size: int, k: int | None = None) -> int:
        size = input_size
        for block in self.blocks[: self._check_k(k)]:
            size = (size + 2 * block.padding - block.kernel_size + 1) // block.pool
        return size

    def out_channels(self, k: int | None = None) -> int:
        return self.arch.widths[self._check_k(k) - 1]

    def prefix(self, k: int) -> LayerwiseNet:
        net = self._share_prefix(LayerwiseNet.__new__(LayerwiseNet), k)
        net.arch = self.arch.truncated(k)
        return net


INIT_SCALE = 0.1  # the default conv-weight scale of a freshly drawn network (layer-wise and supervised)


def initial_network(arch: ArchConfig, images: torch.Tensor, seed: int, init_scale: float = INIT_SCALE) -> LayerwiseNet:
    """A freshly drawn ``LayerwiseNet(arch)``: seeded by ``seed``, its input normalised by uint8
    ``images``' channel statistics, every conv weight scaled by ``init_scale`` (faint init noise,
    so that the filters training makes show). Layer-wise pretraining and the supervised baseline
    both start here: with the same seed they start from the same filters."""
    torch.manual_seed(seed)
    net = LayerwiseNet(arch)
    net.set_normalization(images)
    with torch.no_grad():
        for block in net.blocks:
            block.conv.weight.mul_(init_scale)
    return net


def set_trainable(module: nn.Module, trainable: bool) -> None:
    """Switch gradients of every parameter of ``module`` on or off (and train/eval mode)."""
    module.train(trainable)
    for p in module.parameters():
        p.requires_grad_(trainable)


def reset_parameters(module: nn.Module) -> None:
    """Re-initialise every sub-module of ``module`` that has ``reset_parameters`` (PyTorch's default
    initialisation), from the global RNG."""
    for layer in module.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
