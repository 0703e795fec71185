"""Tensor-level entry points of the C kernels (:mod:`.native`) used by the core modules: each takes
and returns tensors, and returns None where its kernel does not apply or cannot be built here, so
the caller runs its PyTorch path (the same values; tested against it)."""
from __future__ import annotations

import torch

from ..device import in_vmap
from . import native


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor | None:
    """``(x - mean) / std`` per channel (uint8 ``x`` divided by 255 first), written channels_last,
    in one pass of ``csrc/normalize.c``: float32 or uint8 CPU input that needs no gradient. The
    same float32 operations as the PyTorch path."""
    applies = (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.uint8)
               and not in_vmap(x) and not in_vmap(mean)
               and mean.dtype == std.dtype == torch.float32 and mean.is_contiguous() and std.is_contiguous()
               and not (x.requires_grad and torch.is_grad_enabled()))
    kernel = native.normalize_kernel() if applies else None
    if kernel is None:
        return None
    n, channels, height, width = x.shape
    out, strides = torch.empty(n, height, width, channels), torch.tensor(x.stride())
    native.check(kernel(n, channels, height, width, strides.data_ptr(), x.data_ptr(), x.dtype == torch.uint8,
                        mean.data_ptr(), std.data_ptr(), out.data_ptr()), "the normalisation")
    return out.permute(0, 3, 1, 2)


def cut_and_augment(frames: torch.Tensor, where, size: int, geometry: torch.Tensor | None,
                    colour: torch.Tensor | None, settings: torch.Tensor) -> torch.Tensor | None:
    """The ``size`` x ``size`` patches of uint8 channels_last CPU ``frames`` at ``where`` (a
    :class:`~contrastive_lw.patches.PatchIndex`), warped and coloured by the 6 x n draws (None:
    that step off) with the augmentation's ``settings``, as floats in [0, 1]: one pass of
    ``csrc/cut_and_augment.c``.

    Raises:
        ValueError: a position outside the frames.
    """
    applies = _kernel_applies(frames, settings) and len(where.image)
    kernel = native.cut_and_augment_kernel() if applies else None
    if kernel is None:
        return None
    n, (count, channels, height, width) = len(where.image), frames.shape
    image, top, left = (index.to("cpu", torch.int64).contiguous() for index in where)
    if not all(_within(index, bound) for index, bound in zip((image, top, left),
                                                             (count - 1, height - size, width - size))):
        raise ValueError(f"patch positions out of range for {size} x {size} patches of {height} x {width} images")
    out = torch.empty(n, size, size, channels)
    status = kernel(frames.data_ptr(), height, width, channels, image.data_ptr(), top.data_ptr(), left.data_ptr(),
                    n, size, _pointer(geometry), _pointer(colour), settings.data_ptr(),
                    torch.get_num_threads(), out.data_ptr())
    native.check(status, "the augmentation")
    return out.permute(0, 3, 1, 2)


def uniform(seed: int, count: int) -> torch.Tensor | None:
    """``count`` counter-based uniform draws of ``seed`` on the CPU (``csrc/uniform.c``, in parallel)."""
    kernel = native.uniform_kernel()
    if kernel is None:
        return None
    out = torch.empty(count)
    kernel(seed, count, out.data_ptr())
    return out


def exp_row_sums_(similar: torch.Tensor, shift: float) -> torch.Tensor | None:
    """``similar`` (square, float32, CPU) replaced in place by ``exp(similar - shift)`` with a zero
    diagonal, and its row sums returned, in one pass of ``csrc/exp_rows.c``."""
    kernel = native.exp_row_sums_kernel() if similar.device.type == "cpu" and similar.dtype == torch.float32 else None
    if kernel is None:
        return None
    sums = similar.new_empty(len(similar))
    kernel(len(similar), similar.stride(0), similar.data_ptr(), shift, sums.data_ptr())
    return sums


class CosineTriplet(torch.autograd.Function):
    """:class:`TripletLoss` with the cosine distance and no mining on the CPU, loss and gradient in
    one pass of the C kernel ``csrc/cosine_triplet.c`` (:mod:`contrastive_lw.accel.native`); the same
    values as the PyTorch path up to float32 rounding (tested). The PyTorch path is ~30 element-wise
    ops over the embeddings, forward and backward."""

    @staticmethod
    def applies(*rows: torch.Tensor) -> bool:
        """Whether the kernel takes these embeddings (float32 B x D on the CPU, and it is built here)."""
        return (all(x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape == rows[0].shape
                    for x in rows) and native.cosine_triplet_kernel() is not None)

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                margin: float) -> torch.Tensor:
        rows = [x.contiguous() for x in (anchor, positive, negative)]
        batch, dim = anchor.shape
        hinge = anchor.new_empty(batch)
        grads = anchor.new_empty(3, batch, dim) if any(ctx.needs_input_grad[:3]) else None
        pointers = [g.data_ptr() for g in grads] if grads is not None else [None] * 3
        native.cosine_triplet_kernel()(batch, dim, *(x.data_ptr() for x in rows), margin, hinge.data_ptr(), *pointers)
        ctx.save_for_backward(grads)
        return hinge.mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        grads = ctx.saved_tensors[0]
        if float(grad) != 1:  # loss.backward() gives 1 (on the CPU: no sync to read it); a pass saved
            grads = grads * grad
        return grads[0], grads[1], grads[2], None


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
