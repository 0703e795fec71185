"""Device choice and mixed precision: CUDA with bf16 autocast when present, else float32 CPU."""
from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an unavailable device is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available: use --device cpu")
    return device


def in_vmap(x: torch.Tensor) -> bool:
    """Whether ``x`` is a tensor batched by ``torch.func.vmap`` (it has no data pointer or layout)."""
    return torch._C._functorch.is_batchedtensor(x)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing on CPU (float32: without AVX512-BF16 or AMX bf16 matmul is
    far slower, and with them it was not enough faster to switch: docs/PERFORMANCE.md).
    No cast cache, so that a CUDA graph may capture it (:mod:`contrastive_lw.cudagraph`)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()
