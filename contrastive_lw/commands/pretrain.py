"""``contrastive-lw pretrain``: greedy layer-wise (or end-to-end) contrastive pretraining."""
from __future__ import annotations

import argparse
from typing import Any

from .common import (add_backbone_choice, add_data_arguments, add_run_arguments, backbone_settings, data_settings,
                     file_config, parse_float_list, parse_int_list, parse_str_list)

HELP = "pretrain conv blocks without labels, one layer at a time (or end-to-end)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser)
    add_run_arguments(parser, "run directory; re-running into it resumes after its last finished layer")
    group = parser.add_argument_group("training (flags override --config)")
    add_backbone_choice(group)
    group.add_argument("--layers", type=int,
                       help="number of blocks to pretrain (default: all of --widths; a torchvision net's five)")
    group.add_argument("--widths", type=parse_int_list, help="lw: filters per block, e.g. 64,128,256")
    group.add_argument("--mode", choices=("greedy", "end2end"), help="layer by layer (default) or all at once")
    group.add_argument("--epochs-per-layer", type=parse_float_list,
                       help="per layer, last repeats, e.g. 4,1: each layer's length in epochs "
                            "(default: block 1 four epochs, block 2 one, deeper blocks 800 steps)")
    group.add_argument("--steps-per-layer", type=parse_int_list,
                       help="per layer, last repeats, e.g. 1200,300; overrides --epochs-per-layer")
    group.add_argument("--joint-fraction", type=float,
                       help="after the greedy layers, train all of them together for this fraction of the "
                            "last layer's steps (default 0.25; 0: none, the paper's purely greedy training)")
    group.add_argument("--batch-size", type=parse_int_list,
                       help="anchors per step, per layer, last repeats (default 512,512,128; one value: every layer)")
    group.add_argument("--lr", type=float, help="default 0.003 (the paper's triplet setting was run at 0.001)")
    group.add_argument("--loss", choices=("triplet", "infonce"),
                       help="infonce (default: in-batch softmax) or triplet (the paper's cosine triplet loss)")
    group.add_argument("--margin", type=float)
    group.add_argument("--mining", choices=("none", "hardest", "semihard", "all"),
                       help="triplet negatives mined in the batch: hardest, semihard or all (batch-all)")
    group.add_argument("--soft-margin", type=float,
                       help="triplet: softplus(s * x) / s in place of the hinge relu(x) (default 0: the hinge)")
    group.add_argument("--distance", choices=("cosine", "sqeuclidean"))
    group.add_argument("--positive", type=parse_str_list,
                       help="per layer, last repeats: adjacent, shift or exemplar (default adjacent,exemplar)")
    group.add_argument("--negative", choices=("other_image", "same_image"),
                       help="triplet negatives: a patch of another image (default, the paper's) or a "
                            "non-overlapping patch of the anchor's own image")
    group.add_argument("--patch-size", type=parse_int_list, help="per layer (default: the receptive field)")
    group.add_argument("--no-pool1", action="store_true", help="block 1 without max-pool (the paper's ablation)")
    group.add_argument("--no-augment", action="store_true")
    group.add_argument("--seed", type=int)


def pretrain_settings(args: argparse.Namespace, saved: dict[str, Any] | None) -> dict[str, Any]:
    """The ``pretrain`` config section: the config file's values with the given flags on top."""
    from ..config import from_dict, to_dict
    from ..errors import ConfigError
    from ..model import ArchConfig

    values = dict(saved or {})
    backbone = backbone_settings(args, values.get("backbone"))
    arch = {**to_dict(ArchConfig()), **values.get("arch", {})}
    loss, augment = dict(values.get("loss", {})), dict(values.get("augment", {}))
    flags = {"mode": args.mode, "epochs_per_layer": args.epochs_per_layer, "steps_per_layer": args.steps_per_layer,
             "batch_size": args.batch_size, "lr": args.lr, "positives": args.positive,
             "joint_fraction": args.joint_fraction,
             "patch_sizes": args.patch_size, "seed": args.seed,
             "negative": getattr(args, "negative", None)}
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.epochs_per_layer is not None and args.steps_per_layer is None:
        values["steps_per_layer"] = []  # --epochs-per-layer alone sets every layer's length
    loss.update({k: v for k, v in {"name": args.loss, "margin": args.margin, "mining": args.mining,
                                   "soft_margin": args.soft_margin, "distance": args.distance}.items()
                 if v is not None})
    if args.widths:
        arch["widths"] = args.widths
    if args.layers is not None and backbone.get("name", "lw") != "lw":
        backbone["blocks"] = args.layers
    elif args.layers is not None:
        if not 1 <= args.layers <= len(arch["widths"]):
            raise ConfigError(f"--layers must be between 1 and {len(arch['widths'])} (the number of "
                              "--widths); pass more --widths for a deeper network")
        arch["widths"] = list(arch["widths"])[: args.layers]
    if args.no_pool1:
        arch = to_dict(from_dict(ArchConfig, arch, "pretrain.arch").without_first_pool())
    if args.no_augment:
        augment["enabled"] = False
    return {**values, "arch": arch, "backbone": backbone, "loss": loss, "augment": augment}


def run(args: argparse.Namespace) -> int:
    from ..config import to_dict
    from ..data import load_dataset
    from ..pretrain import LayerwisePretrainer, PretrainConfig
    from ..runs import prepare_run_dir

    settings = file_config(args, {"data", "pretrain"})
    data = data_settings(args, settings.get("data"))
    config = PretrainConfig.from_dict(pretrain_settings(args, settings.get("pretrain")))
    images = load_dataset(data["dataset"], "train", data["data_root"], data["classes"], data["limit"],
                          data["download"]).images
    out = prepare_run_dir(args.out, {"data": data, "pretrain": to_dict(config)}, args.force)
    trainer = LayerwisePretrainer(config, out, args.device, progress=False if args.no_progress else None)
    net = trainer.fit(images)
    print(f"pretrained {net.num_blocks} block(s) on {len(images)} images -> {out}")
    return 0
