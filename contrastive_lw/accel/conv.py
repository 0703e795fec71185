"""CPU fast paths of the greedy block at its receptive field: the convolution as one matmul of
the input's windows, and conv + max-pool + ReLU fused (with C kernels where they build). Each
gives the values of the plain PyTorch layers (tested against them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native


class Conv2d(nn.Conv2d):
    """A stride-1 ``nn.Conv2d`` that, unpadded and while its weights train on the CPU on an input that
    needs no gradient and gives at most 2 x 2 outputs (a greedy block at its receptive field),
    runs as one matmul of the input's k x k windows with the weight.

    The windows are a strided view of the channels_last input, copied once by the matmul's
    reshape (im2col); the FLOPs are the convolution's. oneDNN is slow at these shapes (and faster
    at larger outputs, where the convolution runs). Same parameters, same results;
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


class MatmulReluMaxPool(torch.autograd.Function):
    """ReLU of the max-pool over a whole ``side`` x ``side`` convolution output (``side`` = input
    side - kernel + 1) of channels_last input x: the convolution as matmuls, one max over the
    positions with the bias added after it (a per-channel constant does not move the max) and the
    ReLU, and a backward that gives the weight and bias gradients and no gradient of x. Unfused,
    ReLU, max-pool, their backward passes and layout copies each move the 4x larger convolution
    output through memory.

    On the CPU with the C kernels of ``csrc/max_pool_relu.c`` (:mod:`contrastive_lw.accel.native`) no
    windows are copied: output row r is one matmul of every patch's input rows r..r+k-1 (a strided
    matrix) with the weight placed at each output column (:func:`_output_rows`). The max is a
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
