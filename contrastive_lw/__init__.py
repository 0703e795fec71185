"""contrastive-lw: layer-wise contrastive pretraining of convolutional networks, and transfer.

Public names are imported lazily, so that ``contrastive-lw --help`` starts without loading torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_PUBLIC = {"load_backbone": "checkpoint", "ArchConfig": "model", "ConvBlock": "model",
           "LayerwiseNet": "model", "ProjectionHead": "heads", "Classifier": "heads",
           "keep_freed_memory": "accel.memory", "BlockNet": "blocks", "BackboneConfig": "backbones",
           "TorchvisionBackbone": "backbones", "build_backbone": "backbones"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
