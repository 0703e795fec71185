"""``contrastive-lw supervised``: the supervised baseline, trained with labels on the source data."""
from __future__ import annotations

import argparse

from .common import (add_backbone_choice, add_data_arguments, add_run_arguments, backbone_settings, data_settings,
                     file_config, parse_int_list)

HELP = "train the same network with labels (the supervised initialisation for transfer)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, default="cifar100")
    add_run_arguments(parser, "run directory; its layerK.pt is a --init for transfer")
    group = parser.add_argument_group("training (flags override --config: sections data, arch, backbone, supervised)")
    add_backbone_choice(group)
    group.add_argument("--layers", type=int, help="torchvision nets: train the first N of the five blocks (default all)")
    group.add_argument("--widths", type=parse_int_list, help="lw: filters per block (default 64,128,256)")
    group.add_argument("--epochs", type=int, help="default 10")
    group.add_argument("--batch-size", type=int, help="default 128")
    group.add_argument("--lr", type=float, help="default 0.001")
    group.add_argument("--seed", type=int, help="default 0")


def run(args: argparse.Namespace) -> int:
    from ..backbones import BackboneConfig
    from ..config import from_dict, to_dict
    from ..data import load_dataset
    from ..model import ArchConfig
    from ..runs import prepare_run_dir
    from ..supervised import train_supervised
    from ..transfer import TransferConfig

    settings = file_config(args, {"data", "arch", "backbone", "supervised"})
    data = data_settings(args, settings.get("data"), default="cifar100")
    arch = from_dict(ArchConfig, {**settings.get("arch", {}), **({"widths": args.widths} if args.widths else {})},
                     "arch config")
    backbone = from_dict(BackboneConfig, {**backbone_settings(args, settings.get("backbone")),
                                          **({"blocks": args.layers} if args.layers else {})}, "backbone")
    flags = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    config = TransferConfig.from_dict({"new_widths": [], "hidden": 0, **settings.get("supervised", {}),
                                       **{k: v for k, v in flags.items() if v is not None}})
    train, test = (load_dataset(data["dataset"], split, data["data_root"], data["classes"], data["limit"],
                                data["download"]) for split in ("train", "test"))
    out = prepare_run_dir(args.out, {"data": data, "arch": to_dict(arch), "backbone": to_dict(backbone),
                                     "supervised": to_dict(config)}, args.force)
    result = train_supervised(train, test, arch, config, out, args.device, backbone=backbone)
    print(f"supervised: source test accuracy {100 * result.test_acc:.2f}% -> {out}")
    return 0
