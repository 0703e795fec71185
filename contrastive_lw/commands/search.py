"""``contrastive-lw search``: build a cosine nearest-neighbour index of a dataset's features, and
query it with image files."""
from __future__ import annotations

import argparse

from .common import add_backbone_arguments, add_data_arguments, backbone_settings, data_settings, load_split_and_backbone

HELP = "similar-image search: `search index` builds a cosine index of a dataset, `search query` draws neighbours"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    index = actions.add_parser("index", help="index a dataset split's pooled block features",
                               description="index a dataset split's pooled block features (cosine); prints "
                                           "precision@k with labels as relevance")
    add_backbone_arguments(index)
    add_data_arguments(index, default="sample")
    index.add_argument("--out", required=True, help="index directory: index.npz (+ index.faiss)")
    index.add_argument("--backend", choices=("exact", "faiss"), default="exact",
                       help="exact (a matmul, default) or faiss (approximate HNSW; needs faiss-cpu)")
    index.add_argument("--precision-k", type=int, default=10, help="report precision@k (0: skip)")
    query = actions.add_parser("query", help="draw each query image with its nearest indexed images",
                               description="draw each query image with its nearest indexed images")
    query.add_argument("images", nargs="+", metavar="IMAGE", help="image files of the indexed images' size")
    query.add_argument("--index", required=True, help="a `search index` directory")
    query.add_argument("--init", default=None, help="the backbone (default: the one the index was built with)")
    query.add_argument("--top", type=int, default=8, help="neighbours per query (default 8)")
    query.add_argument("--out", required=True, help="PNG grid: one row per query")
    query.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    return _index(args) if args.action == "index" else _query(args)


def _index(args: argparse.Namespace) -> int:
    import json

    from ..features import describe, export_features
    from ..search import SearchIndex, precision_at_k

    data = data_settings(args, None)
    images, net, layers = load_split_and_backbone(args, data)
    features = export_features(net, images.images, layers, args.pool, args.batch_size,
                               False if args.no_progress else None)
    meta = describe(net, layers, args.pool, init=str(args.init), backbone_config=backbone_settings(args),
                    data={**data, "split": args.split},
                    image_size=list(images.images.shape[-2:]), class_names=images.class_names)
    if args.precision_k and images.labels is not None:
        meta["precision"] = {args.precision_k: precision_at_k(features, images.labels, args.precision_k)}
    out = SearchIndex.build(features, images.labels, meta, args.backend).save(args.out)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    scores = "".join(f"; precision@{k} {100 * p:.1f}%" for k, p in meta.get("precision", {}).items())
    print(f"indexed {len(features)} images, block(s) {layers}, {features.shape[1]} features{scores} -> {out}")
    return 0


def _query(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..backbones import BackboneConfig
    from ..config import from_dict
    from ..data import decode_image, load_dataset
    from ..device import resolve_device
    from ..errors import DataError
    from ..search import SearchIndex
    from ..transfer import load_init
    from ..visualize import save_image_table

    index = SearchIndex.load(args.index)
    data = index.meta["data"]
    collection = load_dataset(data["dataset"], data["split"], data["data_root"], data["classes"], data["limit"])
    torch.manual_seed(0)  # as `search index`: a 'random' init is the same network
    backbone = from_dict(BackboneConfig, index.meta.get("backbone_config"), "backbone")  # a random / torchvision init's
    net = load_init(args.init or index.meta["init"], collection.images, backbone=backbone)[1].to(resolve_device(args.device))
    rows, captions = [], []
    for name in args.images:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"query image {path} does not exist")
        image = decode_image(path, rgb=False)
        scores, neighbours = index.search_images(net, image[None], args.top, what=f"query image {path}")
        found = [collection.images[i] for i in neighbours[0]]
        names = [collection.class_names[collection.labels[i]] if collection.labels is not None else f"#{i}"
                 for i in neighbours[0].tolist()]
        rows.append([image, *found])
        captions.append([path.name[:16], *(f"{n} {s:.2f}" for n, s in zip(names, scores[0].tolist()))])
    out = save_image_table(rows, args.out, captions, title=f"nearest images by cosine of block(s) "
                                                            f"{index.meta['layers']} features")
    print(f"{len(rows)} quer{'y' if len(rows) == 1 else 'ies'}, top {args.top} -> {out}")
    return 0
