"""Feature export: the pooled features of chosen blocks of any backbone (a module with
``normalize`` and ``blocks``), their labels and a description of the backbone they came from,
saved as one ``.npz``.

Example:
    >>> net = LayerwiseNet(ArchConfig(widths=(8, 16)))                      # doctest: +SKIP
    >>> x = export_features(net, images, layers=[1, 2])                     # doctest: +SKIP
    >>> save_features("F.npz", x, labels, describe(net, [1, 2], pool=4))    # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .blocks import BlockNet
from .errors import ConfigError, DataError
from .evaluate import block_features

DTYPES = ("float16", "float32")


def check_layers(net: nn.Module, layers: Sequence[int]) -> list[int]:
    """``layers`` sorted, or a ConfigError naming the valid range (1..number of blocks)."""
    count = len(net.blocks)
    if not layers or any(not 1 <= k <= count for k in layers) or len(set(layers)) < len(layers):
        raise ConfigError(f"--layers {','.join(map(str, layers))}: give distinct blocks in 1..{count} "
                          f"(the backbone has {count} trained block(s))")
    return sorted(layers)


def check_images(images: torch.Tensor, channels: int, size: tuple[int, int] | None = None,
                 what: str = "images") -> None:
    """A DataError unless ``images`` is uint8 N x ``channels`` x H x W (with H x W = ``size`` when given)."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise DataError(f"{what} must be uint8 N x C x H x W, got {images.dtype} of shape {tuple(images.shape)}")
    if images.shape[1] != channels:
        raise DataError(f"{what}: {images.shape[1]} channel(s), but the backbone takes {channels}: "
                        f"convert to {'RGB' if channels == 3 else f'{channels} channel(s)'} first")
    if size is not None and tuple(images.shape[-2:]) != tuple(size):
        raise DataError(f"{what}: {images.shape[-2]}x{images.shape[-1]} pixels (H x W), but the index "
                        f"holds {size[0]}x{size[1]} images: resize to that first")


def fingerprint(net: nn.Module) -> str:
    """A short hash of every parameter and buffer of ``net``: equal for the same weights."""
    digest = hashlib.sha1()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def describe(net: BlockNet, layers: Sequence[int], pool: int, **extra: Any) -> dict[str, Any]:
    """What the features are: the backbone (class, the :attr:`~contrastive_lw.blocks.BlockNet.spec`
    that rebuilds it, weights' :func:`fingerprint`), the blocks pooled, the pooling side, and
    ``extra`` entries (init, dataset)."""
    backbone = {"class": type(net).__name__, "blocks": len(net.blocks), "fingerprint": fingerprint(net),
                "spec": net.spec}
    return {"backbone": backbone, "layers": list(layers), "pool": pool, **extra}


def export_features(net: nn.Module, images: torch.Tensor, layers: Sequence[int], pool: int = 4,
                    batch_size: int = 256, progress: bool | None = None) -> torch.Tensor:
    """Pooled features N x D (float32, CPU) of blocks ``layers`` of ``net`` for uint8 ``images``:
    the read-outs' :func:`~contrastive_lw.evaluate.block_features`, after checking the inputs."""
    layers = check_layers(net, layers)
    check_images(images, net.in_channels)
    return block_features(net, images, layers, pool, batch_size, progress)


def save_features(path: str | Path, features: torch.Tensor, labels: torch.Tensor | None,
                  meta: dict[str, Any], dtype: str = "float32") -> Path:
    """Write ``features`` (as ``dtype``), ``labels`` (when given) and ``meta`` (JSON) to an ``.npz``."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"features": features.numpy().astype(dtype), "meta": np.array(json.dumps(meta))}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    np.savez(path, **arrays)
    return path


def load_features(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(features, labels or None, meta) of a :func:`save_features` file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return (arrays["features"], arrays["labels"] if "labels" in arrays else None,
                    json.loads(str(arrays["meta"])))
    except (OSError, ValueError, KeyError, EOFError):
        raise DataError(f"{path} is not a features file written by `contrastive-lw features`") from None
