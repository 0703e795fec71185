"""Host memory: make glibc's ``malloc`` keep a training loop's freed memory for reuse (no torch
import at the top, so the command line can call it before anything loads), and copy a large tensor
to memory backed by transparent huge pages."""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

KEEP_FREED_MEMORY_ENV = "CONTRASTIVE_LW_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(largest: int = 1 << 30) -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse: blocks up to ``largest`` bytes come from
    the heap instead of fresh ``mmap`` pages, and the heap is never trimmed.

    A training loop frees and reallocates the same few-MB tensors every step; by default glibc
    hands some of them back to the OS and the next step faults every page in again (about 1.3 us
    a 4 KiB page in a VM: a frozen block-1 forward on 1 024 13x13 patches took 20 ms instead of
    8.5 ms). The process then keeps its peak memory until it ends, as PyTorch's CUDA caching
    allocator does on a GPU. The command line calls this once at start; call it at the start of a
    script of your own.

    Returns whether it applied: not on other C libraries (macOS, Windows, musl), nor when the
    environment variable ``CONTRASTIVE_LW_KEEP_FREED_MEMORY`` is ``0``.

    Example:
        >>> from contrastive_lw import keep_freed_memory
        >>> keep_freed_memory()  # doctest: +SKIP
        True
    """
    if os.environ.get(KEEP_FREED_MEMORY_ENV) == "0" or not _on_glibc():
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    return bool(mallopt(_M_MMAP_THRESHOLD, largest) and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


HUGE_PAGE = 2 << 20


def on_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a contiguous or channels_last CPU ``tensor`` of at least two huge pages (4 MiB),
    with the same strides, in an anonymous mapping advised ``MADV_HUGEPAGE`` (Linux); elsewhere, or
    where the advice is refused, ``tensor`` itself.

    Patches cut at random places of a dataset's frames touch a new 4 KiB page each row, and the
    TLB holds a few MB of them: the patch kernel waits on page walks, fewer on 2 MiB pages
    (docs/PERFORMANCE.md). The mapping lives as long as the copy."""
    import torch

    nbytes = tensor.numel() * tensor.element_size()
    dense = tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last))
    if (tensor.device.type != "cpu" or not dense or nbytes < 2 * HUGE_PAGE or not sys.platform.startswith("linux")
            or not hasattr(mmap, "MADV_HUGEPAGE")):
        return tensor
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        memory.madvise(mmap.MADV_HUGEPAGE)  # before the copy touches the pages
    except OSError:  # a kernel without transparent huge pages
        memory.close()
        return tensor
    copy = torch.frombuffer(memory, dtype=tensor.dtype).as_strided(tensor.shape, tensor.stride())
    return copy.copy_(tensor)


def _on_glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):  # a C library that does not know the name
        return False
