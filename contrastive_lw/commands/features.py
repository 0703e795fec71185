"""``contrastive-lw features``: export the pooled features of chosen blocks to an .npz."""
from __future__ import annotations

import argparse

from .common import add_backbone_arguments, add_data_arguments, data_settings, load_split_and_backbone

HELP = "export pooled features of chosen blocks (and labels) of a dataset to an .npz"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_backbone_arguments(parser)
    add_data_arguments(parser, default="sample")
    parser.add_argument("--out", required=True, help="output .npz: features, labels (when labelled), meta (JSON)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float32")


def run(args: argparse.Namespace) -> int:
    from ..features import describe, export_features, save_features

    data = data_settings(args, None)
    images, net, layers = load_split_and_backbone(args, data)
    features = export_features(net, images.images, layers, args.pool, args.batch_size, False if args.no_progress else None)
    meta = describe(net, layers, args.pool, init=str(args.init), data={**data, "split": args.split})
    path = save_features(args.out, features, images.labels, meta, args.dtype)
    print(f"{features.shape[0]} x {features.shape[1]} features of block(s) {layers} ({args.dtype}) -> {path}")
    return 0
