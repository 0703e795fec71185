"""The supervised baseline: the same network trained with labels on the source data."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .checkpoint import save_backbone
from .config import to_dict
from .data import ImageData
from .backbones import BackboneConfig, initial_backbone
from .model import INIT_SCALE, ArchConfig
from .runs import RunLogger
from .transfer import TransferConfig, TransferResult, train_transfer


def train_supervised(train: ImageData, test: ImageData, arch: ArchConfig, config: TransferConfig,
                     out_dir: str | Path, device: str = "auto", tensorboard: bool = True,
                     backbone: BackboneConfig | None = None, init_scale: float = INIT_SCALE) -> TransferResult:
    """Train every block of a fresh backbone (``backbone``, by default the ``lw`` net of ``arch``;
    :func:`~contrastive_lw.backbones.initial_backbone`: seeded by ``config.seed``, ``lw`` conv weights x
    ``init_scale``, as layer-wise pretraining starts) plus a classifier head on labelled ``train``
    (CIFAR-100, or the source classes of the class-split protocol) and save its blocks as
    ``out_dir/layerK.pt`` (mode ``supervised``): the "supervised" initialisation for transfer."""
    net = initial_backbone(backbone or BackboneConfig(), arch, train.images, config.seed, init_scale)
    config = dataclasses.replace(config, mode="finetune", layers=net.num_blocks)
    with RunLogger(out_dir, tensorboard) as logger:
        result, model = train_transfer(net, train, test, config, device, logger)
    save_backbone(Path(out_dir) / f"layer{net.num_blocks}.pt", model.backbone, "supervised",
                  config=to_dict(config), metrics=dataclasses.asdict(result))
    return result
