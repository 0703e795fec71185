"""Convolutional blocks, the layer-wise network with its receptive-field math, projection heads."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .config import per_layer
from .errors import ConfigError


@dataclass(frozen=True)
class ArchConfig:
    """Shape of a :class:`LayerwiseNet`. ``widths`` sets the number of blocks; the other
    per-block tuples repeat their last entry for deeper blocks.

    The default is the seed network: block 1 = conv 6x6 -> ReLU -> max-pool 2x2 (7x7 receptive
    field), blocks 2-3 = conv 3x3 -> BatchNorm -> ReLU -> max-pool 2x2 (13x13 and 25x25).
    ``pools`` entry 1 means no pooling (the paper's pooling ablation is ``pools: [1, 2]``).
    """

    in_channels: int = 3
    widths: tuple[int, ...] = (64, 128, 256)
    kernel_sizes: tuple[int, ...] = (6, 3)
    pools: tuple[int, ...] = (2,)
    batch_norm: tuple[bool, ...] = (False, True)

    def __post_init__(self) -> None:
        for name in ("widths", "kernel_sizes", "pools", "batch_norm"):
            if len(getattr(self, name)) == 0:
                raise ConfigError(f"arch.{name} must hold at least one value")
        for name in ("in_channels", *self.widths, *self.kernel_sizes, *self.pools):
            value = self.in_channels if name == "in_channels" else name
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"arch sizes must be positive integers, got {value!r}")

    @property
    def num_blocks(self) -> int:
        return len(self.widths)

    def block(self, k: int) -> tuple[int, int, int, int, bool]:
        """(in_channels, out_channels, kernel, pool, batch_norm) of block ``k`` (1-based)."""
        in_ch = self.in_channels if k == 1 else self.widths[k - 2]
        return (in_ch, self.widths[k - 1], per_layer(self.kernel_sizes, k),
                per_layer(self.pools, k), per_layer(self.batch_norm, k))

    def truncated(self, k: int) -> ArchConfig:
        """The same architecture with only its first ``k`` blocks."""
        return dataclasses.replace(self, widths=self.widths[:k])


class Conv2d(nn.Conv2d):
    """An unpadded, stride-1 ``nn.Conv2d`` that, while its weights train on the CPU on an input that
    needs no gradient and gives at most 2 x 2 outputs (a greedy block at its receptive field),
    runs as one matmul of the input's k x k windows with the weight.

    The windows are a strided view of the channels_last input, copied once by the matmul's
    reshape (im2col); the FLOPs are the convolution's. oneDNN is slow at these shapes: the
    convolution's forward + weight gradient is 1.6x faster this way on 2 CPU cores and slower
    at larger outputs (``python experiments/conv_timing.py``). Same parameters, same results;
    ``matmul_path = False`` (on the class or one instance) always runs the convolution."""

    matmul_path: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._as_matmul(x):
            return self._im2col_forward(x)
        return super().forward(x)

    def _as_matmul(self, x: torch.Tensor) -> bool:
        kernel = self.kernel_size[0]
        return (self.matmul_path and x.device.type == "cpu" and self.weight.requires_grad and torch.is_grad_enabled()
                and not x.requires_grad and x.dim() == 4 and x.shape[-2] == x.shape[-1]
                and 1 <= x.shape[-1] - kernel + 1 <= 2 and self.kernel_size[1] == kernel
                and self.stride == (1, 1) and self.padding == (0, 0) and self.dilation == (1, 1) and self.groups == 1)

    def _im2col_forward(self, x: torch.Tensor) -> torch.Tensor:
        n, m = x.shape[0], x.shape[-1] - self.kernel_size[0] + 1
        y = F.linear(im2col(x, self.kernel_size[0]), flat_weight(self.weight), self.bias)
        return y.view(n, m, m, self.out_channels).permute(0, 3, 1, 2)  # channels_last memory


def im2col(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """The k x k windows of x (N x C x S x S), (N * outputs) x (k * k * C) in (image, row, column)
    order: a strided view of the channels_last pixels, copied once by the reshape."""
    n, channels, side, _ = x.shape
    m = side - kernel + 1
    pixels = x.permute(0, 2, 3, 1).contiguous()  # a view for channels_last input
    row = side * channels
    windows = pixels.as_strided((n, m, m, kernel, kernel * channels), (side * row, row, channels, row, 1))
    return windows.reshape(n * m * m, -1)


def flat_weight(weight: torch.Tensor) -> torch.Tensor:
    """A convolution weight C_out x C_in x k x k as C_out x (k * k * C_in), in :func:`im2col`'s order."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


class _MatmulReluMaxPool(torch.autograd.Function):
    """ReLU of the max-pool over a whole ``side`` x ``side`` convolution output (``side`` = input
    side - kernel + 1) of channels_last input x: the convolution as matmuls, one max over the
    positions with the bias added after it (a per-channel constant does not move the max) and the
    ReLU, and a backward that gives the weight and bias gradients and no gradient of x. Unfused,
    ReLU, max-pool, their backward passes and layout copies each move the 4x larger convolution
    output through memory: the greedy layer-1 step is ~1.2x faster fused.

    On the CPU with the C kernels of ``csrc/max_pool_relu.c`` (:mod:`contrastive_lw.native`) no
    windows are copied: output row r is one matmul of every patch's input rows r..r+k-1 (a strided
    matrix) with the weight placed at each output column (:func:`_output_rows`; the greedy layer-1
    step 8.8-9.5 -> 7.5-8.1 ms against im2col, AVX-512 Xeon, docs/PERFORMANCE.md). The max is a
    kernel, and so is the backward: each output's gradient reaches only its winning window, so the
    weight's gradient sums those windows alone, read from x (1/4 of the terms of the dense product
    at 2 x 2). Elsewhere the windows are copied out (im2col) for one matmul, then PyTorch's
    max-pool, a scatter of the gradient to the winning position (the first on ties, as
    ``max_pool2d``) and windows.T @ gradient (the faster operand order here); the bench counts the
    model's FLOPs on this path."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, channels, kernel = x.shape[0], weight.shape[0], weight.shape[-1]
        side = x.shape[-1] - kernel + 1
        applies = x.device.type == "cpu" and x.dtype == torch.float32 and side * side <= 256  # winners: bytes
        kernels = native.max_pool_relu_kernels() if applies else None
        ctx.weight_shape = weight.shape
        if kernels is None:
            windows = im2col(x, kernel)
            out = windows @ flat_weight(weight).t()
            best, where = F.max_pool2d_with_indices(out.view(n, side, side, channels).permute(0, 3, 1, 2), side)
            best = torch.add(best.view(n, channels), bias).clamp_min_(0)  # channels_last N x C x 1 x 1: a view
            ctx.save_for_backward(windows, where.view(n, channels), best)
            return best
        pixels = x.permute(0, 2, 3, 1).contiguous()  # N x S x S x C: a view of channels_last input
        planes = _output_rows(pixels, weight, side)
        best, where = planes.new_empty(n, channels), torch.empty(n, channels, dtype=torch.uint8)
        bias = bias.detach().contiguous()  # named: a temporary's memory would be freed before the call
        kernels[0](n, side, side, channels, planes.data_ptr(), planes.stride(0), bias.data_ptr(), best.data_ptr(),
                   where.data_ptr())
        ctx.save_for_backward(pixels, where, best)
        return best

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved, where, best = ctx.saved_tensors
        channels, in_channels, kernel, _ = ctx.weight_shape
        if where.dtype == torch.uint8:  # the C kernels' forward: the gradients from the winning windows alone
            pixels, grad = saved, grad.contiguous()  # named: kept alive through the call
            n, size, _, _ = pixels.shape
            side, row = size - kernel + 1, size * in_channels
            features = (kernel - 1) * row + kernel * in_channels  # a window's rows and the pixels between them
            grad_rows, grad_bias = grad.new_empty(channels, features), grad.new_empty(channels)
            native.check(native.max_pool_relu_kernels()[1](
                n, side * side, side, channels, features, pixels.data_ptr(), size * row, row, in_channels,
                grad.data_ptr(), best.data_ptr(), where.data_ptr(), grad_rows.data_ptr(), grad_bias.data_ptr()),
                "the max-pool")
            grad_rows = F.pad(grad_rows, (0, row - kernel * in_channels)).view(channels, kernel, size, in_channels)
            return None, grad_rows[:, :, :kernel].contiguous().permute(0, 3, 1, 2), grad_bias
        windows, n = saved, grad.shape[0]
        grad = grad * best.sign()  # ReLU: no gradient where the max was <= 0
        grad_out = grad.new_zeros(n, windows.shape[0] // n, channels).scatter_(1, where.unsqueeze(1), grad.unsqueeze(1))
        grad_weight = (windows.t() @ grad_out.view(windows.shape[0], -1)).t()
        return None, grad_weight.reshape(channels, kernel, kernel, in_channels).permute(0, 3, 1, 2), grad.sum(0)


def _output_rows(pixels: torch.Tensor, weight: torch.Tensor, side: int) -> torch.Tensor:
    """side x N x (side * C_out): row r of the convolution of pixels (N x S x S x C_in, contiguous)
    with weight (C_out x C_in x k x k), output column c at c * C_out. Input rows r..r+k-1 of all
    patches are one N x (k * S * C_in) matrix (rows S * S * C_in apart, no copy); the weight is
    placed at each output column of a k x S window, zeros elsewhere (S / k more multiply-adds)."""
    n, size, _, in_channels = pixels.shape
    channels, kernel = weight.shape[0], weight.shape[-1]
    placed = weight.new_zeros(side, channels, kernel, size, in_channels)
    for column in range(side):
        placed[column, :, :, column:column + kernel] = weight.permute(0, 2, 3, 1)
    placed = placed.view(side * channels, -1).t()
    flat, row = pixels.view(n, -1), size * in_channels
    planes = pixels.new_empty(side, n, side * channels)
    for r in range(side):
        torch.mm(flat[:, r * row:(r + kernel) * row], placed, out=planes[r])
    return planes


class ConvBlock(nn.Sequential):
    """conv (stride 1, no padding) -> [BatchNorm] -> ReLU -> [max-pool]. The forward pass pools
    before the ReLU: max-pool and ReLU commute, and the ReLU and its backward then run on the
    pooled map (the end-to-end pretraining step 1.04x faster, docs/PERFORMANCE.md)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 pool: int = 2, batch_norm: bool = False) -> None:
        layers: list[nn.Module] = [Conv2d(in_channels, out_channels, kernel_size, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
        if pool > 1:
            layers.append(nn.MaxPool2d(pool))
        super().__init__(*layers)
        self.kernel_size, self.pool = kernel_size, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):
            return _MatmulReluMaxPool.apply(x, self.conv.weight, self.conv.bias).view(x.shape[0], -1, 1, 1)
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


class LayerwiseNet(nn.Module):
    """A stack of :class:`ConvBlock` s trained one block at a time.

    Inputs are images in [0, 1] (float) or uint8; the network normalises them with its own
    per-channel ``mean``/``std`` buffers, so a loaded backbone needs no outside preprocessing.

    Example:
        >>> net = LayerwiseNet(ArchConfig())
        >>> [net.receptive_field(k) for k in (1, 2, 3)]
        [7, 13, 25]
        >>> net(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 256, 1, 1])
    """

    def __init__(self, arch: ArchConfig | None = None) -> None:
        super().__init__()
        self.arch = arch or ArchConfig()
        self.blocks = nn.Sequential(*(ConvBlock(*self.arch.block(k))
                                      for k in range(1, self.arch.num_blocks + 1)))
        self.register_buffer("mean", torch.full((self.arch.in_channels,), 0.5))
        self.register_buffer("std", torch.full((self.arch.in_channels,), 0.25))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def set_normalization(self, images: torch.Tensor) -> None:
        """Set the per-channel mean/std from uint8 images N x C x H x W (a sample is enough)."""
        x = images[: 4096].float().div_(255)
        self.mean.copy_(x.mean(dim=(0, 2, 3)))
        self.std.copy_(x.std(dim=(0, 2, 3)).clamp_min(1e-3))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel (uint8 input: ``x / 255`` first), laid out channels_last,
        the layout the convolutions are fastest in on CPU and GPU (block features of 32x32 images 2x,
        a fine-tuning step 1.27-1.32x on the CPU: ``experiments/layout_timing.py``). The arithmetic
        runs before the layout change: per-channel arithmetic on channels_last patches is ~1.8x
        slower. One fused ``addcmul`` is ~1.7x faster but made a two-process run drift 4e-5 from
        the one-process run (tests/test_distributed.py), so it is not used. On the CPU, without
        gradient, one pass of the C kernel ``csrc/normalize.c`` does the same float32 operations
        (1.0 -> 0.3 ms for a greedy layer-1 batch of 6 144 7x7 patches, ``experiments/kernel_timing.py``)."""
        kernel = native.normalize_kernel() if self._native_normalize(x) else None
        if kernel is not None:
            n, channels, height, width = x.shape
            out, strides = torch.empty(n, height, width, channels), torch.tensor(x.stride())
            native.check(kernel(n, channels, height, width, strides.data_ptr(), x.data_ptr(), x.dtype == torch.uint8,
                                self.mean.data_ptr(), self.std.data_ptr(), out.data_ptr()), "the normalisation")
            return out.permute(0, 3, 1, 2)
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return x.contiguous(memory_format=torch.channels_last)

    def _native_normalize(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.uint8)
                and self.mean.dtype == self.std.dtype == torch.float32 and self.mean.is_contiguous()
                and self.std.is_contiguous() and not (x.requires_grad and torch.is_grad_enabled()))

    def forward(self, x: torch.Tensor, num_blocks: int | None = None) -> torch.Tensor:
        """Features after the first ``num_blocks`` blocks (all by default)."""
        return self.blocks[: self.num_blocks if num_blocks is None else num_blocks](self.normalize(x))

    def receptive_field(self, k: int | None = None) -> int:
        """Side of the input patch that one output unit of block ``k`` sees."""
        size, jump = 1, 1
        for block in self.blocks[: self._check_k(k)]:
            size += (block.kernel_size - 1) * jump
            size += (block.pool - 1) * jump
            jump *= block.pool
        return size

    def output_size(self, input_size: int, k: int | None = None) -> int:
        """Spatial side of block ``k``'s output for a square input of side ``input_size``."""
        size = input_size
        for block in self.blocks[: self._check_k(k)]:
            size = (size - block.kernel_size + 1) // block.pool
        return size

    def out_channels(self, k: int | None = None) -> int:
        return self.arch.widths[self._check_k(k) - 1]

    def prefix(self, k: int) -> LayerwiseNet:
        """A network made of (shared, not copied) blocks 1..k and the same normalisation."""
        net = LayerwiseNet.__new__(LayerwiseNet)
        nn.Module.__init__(net)
        net.arch = self.arch.truncated(self._check_k(k))
        net.blocks = self.blocks[:k]
        net.register_buffer("mean", self.mean)
        net.register_buffer("std", self.std)
        return net

    def _check_k(self, k: int | None) -> int:
        k = self.num_blocks if k is None else k
        if not 1 <= k <= self.num_blocks:
            raise ConfigError(f"block index {k} out of range: the network has {self.num_blocks} blocks")
        return k


class ProjectionHead(nn.Sequential):
    """Fully-connected projection of a block's (flattened) output map to an embedding.

    ``hidden=0`` gives a linear head, otherwise Linear -> BatchNorm -> ReLU -> Linear.
    """

    def __init__(self, in_features: int, out_dim: int = 128, hidden: int = 0) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        if hidden:
            layers += [nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            in_features = hidden
        layers.append(nn.Linear(in_features, out_dim))
        super().__init__(*layers)

    def output_basis(self) -> torch.Tensor | None:
        """An orthonormal basis, out_dim x (in_features + 1), of the space a linear head's outputs
        lie in (spanned by its weight's columns and its bias) when that space is smaller than the
        embedding, else None. Distances and similarities of the outputs equal those of their
        coordinates in this basis, and so do a loss of them and its gradient (the gradient with
        respect to each output is a combination of outputs: it lies in the space too); a loss that
        compares all pairs of the batch costs fewer FLOPs on the coordinates. The greedy block-1 head
        (64 -> 128) has 65 of them: its InfoNCE step ~1.2-1.3x faster at batch 512 (docs/PERFORMANCE.md)."""
        linear, hidden = self[-1], len(self) > 2  # Flatten, [Linear, BatchNorm, ReLU,] Linear
        if hidden or linear.in_features + (linear.bias is not None) >= linear.out_features:
            return None
        with torch.no_grad():
            columns = linear.weight if linear.bias is None else torch.cat([linear.weight, linear.bias[:, None]], 1)
            return torch.linalg.qr(columns).Q


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


class Classifier(nn.Module):
    """A transferred backbone (blocks 1..k) -> new conv blocks -> fc -> fc: the paper's downstream net.

    New blocks are conv 3x3 (padding 1) -> BatchNorm -> ReLU -> max-pool 2x2 (no pooling once the
    map is 1x1), so they fit above any backbone; ``hidden=0`` drops the middle fc layer. They pool
    before the ReLU, as :class:`ConvBlock` does: the same map, the ReLU on a 4x smaller one.

    Example:
        >>> clf = Classifier(LayerwiseNet().prefix(1), num_classes=10, new_widths=(512,), hidden=512)
        >>> clf(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, backbone: LayerwiseNet, num_classes: int, new_widths: tuple[int, ...] = (512,),
                 hidden: int = 512, image_size: int = 32) -> None:
        super().__init__()
        self.backbone = backbone
        side = backbone.output_size(image_size)
        if side < 1:
            raise ConfigError(f"{image_size}x{image_size} images are smaller than the backbone's "
                              f"receptive field {backbone.receptive_field()}: transfer fewer layers")
        channels, layers = backbone.out_channels(), []
        for width in new_widths:
            pool = 2 if side >= 2 else 1
            layers.append(nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                        nn.MaxPool2d(pool), nn.ReLU(inplace=True)))
            channels, side = width, side // pool
        self.new_blocks = nn.Sequential(*layers)
        fc: list[nn.Module] = [nn.Flatten()]
        features = channels * side * side
        if hidden:
            fc += [nn.Linear(features, hidden), nn.ReLU(inplace=True)]
            features = hidden
        self.fc = nn.Sequential(*fc, nn.Linear(features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.new_blocks(self.backbone(x)))
