"""What every backbone is: an ordered list of blocks behind its own input normalisation.

:class:`BlockNet` is the interface the rest of the project uses (pretraining, transfer, read-outs,
features, Head2Toe): ``blocks`` (an ``nn.Sequential``, block k is ``blocks[k - 1]``), the output of
blocks 1..k (``forward(x, k)``), every block's output at once (:meth:`BlockNet.block_outputs`),
each block's output channels and stride, the receptive field of blocks 1..k, the output side for
an input side, a :meth:`BlockNet.prefix` sharing the first k blocks, and a :attr:`BlockNet.spec` that
:func:`contrastive_lw.backbones.backbone_from_spec` rebuilds the network from (checkpoints store it).
:class:`~contrastive_lw.model.LayerwiseNet` (the project's own net) and
:class:`~contrastive_lw.backbones.TorchvisionBackbone` implement it.
"""
from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

from .accel import kernels
from .device import in_vmap
from .errors import ConfigError


class BlockNet(nn.Module, abc.ABC):
    """Base class of the backbones: normalisation buffers, the forward pass over the first k
    blocks and block-index checks. Subclasses set ``blocks`` and implement the geometry
    (:meth:`receptive_field`, :meth:`stride`, :meth:`output_size`, :meth:`out_channels`),
    :meth:`prefix` and :attr:`spec`.

    Inputs are images in [0, 1] (float) or uint8; the network normalises them with its own
    per-channel ``mean``/``std`` buffers, so a loaded backbone needs no outside preprocessing.
    """

    blocks: nn.Sequential

    def _init_normalization(self, channels: int, mean: float | tuple[float, ...] = 0.5,
                            std: float | tuple[float, ...] = 0.25) -> None:
        self.register_buffer("mean", torch.zeros(channels).add_(torch.as_tensor(mean)))
        self.register_buffer("std", torch.zeros(channels).add_(torch.as_tensor(std)))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def in_channels(self) -> int:
        return len(self.mean)

    @property
    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """What rebuilds this network (without its weights): a dict with the backbone's ``name``."""

    def first_conv(self) -> nn.Conv2d:
        """The convolution that sees the input (its filters are the ones worth drawing)."""
        return next(m for m in self.blocks[0].modules() if isinstance(m, nn.Conv2d))

    def set_normalization(self, images: torch.Tensor) -> None:
        """Set the per-channel mean/std from uint8 images N x C x H x W (a sample is enough)."""
        x = images[: 4096].float().div_(255)
        self.mean.copy_(x.mean(dim=(0, 2, 3)))
        self.std.copy_(x.std(dim=(0, 2, 3)).clamp_min(1e-3))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel (uint8 input: ``x / 255`` first), laid out channels_last,
        the layout the convolutions are fastest in on CPU and GPU (docs/PERFORMANCE.md). The
        arithmetic runs before the layout change, and not as one fused ``addcmul``, whose rounding
        made a two-process run drift from the one-process run. On the CPU, without gradient, one
        pass of a C kernel does the same float32 operations (:func:`accel.kernels.normalize`)."""
        fast = kernels.normalize(x, self.mean, self.std)
        if fast is not None:
            return fast
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        if in_vmap(x):  # an ensemble member (contrastive_lw.ensemble): vmap cannot query layouts
            return x
        return x.contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, num_blocks: int | None = None) -> torch.Tensor:
        """Features after the first ``num_blocks`` blocks (all by default; 0: the normalised input)."""
        if num_blocks == 0:
            return self.normalize(x)
        return self.blocks[: self._check_k(num_blocks)](self.normalize(x))

    def block_outputs(self, x: torch.Tensor, num_blocks: int | None = None) -> list[torch.Tensor]:
        """The output of every block 1..``num_blocks`` (all by default), in one pass."""
        x, outputs = self.normalize(x), []
        for block in self.blocks[: self._check_k(num_blocks)]:
            x = block(x)
            outputs.append(x)
        return outputs

    @abc.abstractmethod
    def receptive_field(self, k: int | None = None) -> int:
        """Side of the input patch that one output unit of block ``k`` sees."""

    @abc.abstractmethod
    def stride(self, k: int | None = None) -> int:
        """Input pixels between neighbouring output units of block ``k``."""

    @abc.abstractmethod
    def output_size(self, input_size: int, k: int | None = None) -> int:
        """Spatial side of block ``k``'s output for a square input of side ``input_size``."""

    @abc.abstractmethod
    def out_channels(self, k: int | None = None) -> int:
        """Channels of block ``k``'s output (the last block's by default)."""

    @abc.abstractmethod
    def prefix(self, k: int) -> BlockNet:
        """A network made of (shared, not copied) blocks 1..k and the same normalisation."""

    def _share_prefix(self, net: BlockNet, k: int) -> BlockNet:
        """Fill an uninitialised ``net`` of this class with blocks 1..k and the normalisation buffers."""
        nn.Module.__init__(net)
        net.blocks = self.blocks[: self._check_k(k)]
        net.register_buffer("mean", self.mean)
        net.register_buffer("std", self.std)
        return net

    def _check_k(self, k: int | None) -> int:
        k = self.num_blocks if k is None else k
        if not 1 <= k <= self.num_blocks:
            raise ConfigError(f"block index {k} out of range: the network has {self.num_blocks} blocks")
        return k
