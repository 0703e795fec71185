"""``contrastive-lw advise``: measure how well pretrained blocks fit a target and advise how to
transfer them (optionally checked by a small successive-halving search)."""
from __future__ import annotations

import argparse

from .common import add_backbone_choice, add_data_arguments, backbone_settings, data_settings

HELP = "measure how well pretrained blocks fit a labelled target and advise how to transfer them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", required=True, help="run directory or layerK.pt of the pretrained backbone, "
                                                      "or torchvision:NAME (with --weights)")
    add_backbone_choice(parser, backbone=False)
    add_data_arguments(parser, default="cifar10")
    parser.add_argument("--out", required=True, help="advice JSON file: measures per block and the recommendation")
    parser.add_argument("--config", default=None,
                        help="YAML with optional sections data, transfer (the search's training settings), rules")
    parser.add_argument("--rules", default=None, help="YAML of rule-table values (contrastive_lw.advise.AdviceRules)")
    parser.add_argument("--blocks", type=int, default=None, help="measure blocks 1..K (default: all)")
    parser.add_argument("--held-out", type=float, default=0.2,
                        help="fraction of the target's TRAIN set held out to score measures and the search")
    parser.add_argument("--search", type=int, default=None, metavar="BUDGET",
                        help="successive halving around the advice, within BUDGET training epochs in total")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from ..advise import AdviceRules, recommend, search, write_advice
    from ..backbones import BackboneConfig
    from ..config import from_dict, load_yaml
    from ..data import load_dataset
    from ..device import resolve_device
    from ..errors import ConfigError
    from ..fit import check_labels, fit_table, format_table, split_train, table_rows
    from ..transfer import TransferConfig, load_init

    file_config = load_yaml(args.config) if args.config else {}
    unknown = sorted(set(file_config) - {"data", "transfer", "rules"})
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown} in {args.config}; valid: ['data', 'rules', 'transfer']")
    rules = AdviceRules.from_dict({**file_config.get("rules", {}), **(load_yaml(args.rules) if args.rules else {})})
    base = TransferConfig.from_dict(file_config.get("transfer", {}))
    if not 0 < args.held_out < 1:
        raise ConfigError(f"--held-out must be a fraction in (0, 1), got {args.held_out}")
    data = data_settings(args, file_config.get("data"), default="cifar10")
    target = load_dataset(data["dataset"], "train", data["data_root"], data["classes"], data["limit"], data["download"])
    check_labels(target)
    torch.manual_seed(args.seed)
    init, net = load_init(args.init, target.images,
                          backbone=from_dict(BackboneConfig, backbone_settings(args), "backbone"))
    net = net.to(resolve_device(args.device))
    if args.blocks is not None and not 1 <= args.blocks <= net.num_blocks:
        raise ConfigError(f"--blocks {args.blocks} is beyond the backbone: it has {net.num_blocks} block(s)")
    start = time.perf_counter()
    train, held = split_train(target, args.held_out, args.seed)
    table = fit_table(net, train, held, args.blocks, base.pool, base.head2toe.keep_fraction, args.seed)
    per_class = len(target) / len(target.labels.unique())
    rec = recommend(table, per_class, rules)
    payload = {"init": str(args.init), "init_kind": init, "data": data, "backbone_blocks": net.num_blocks,
               "split": {"fit": len(train), "held_out": len(held), "seed": args.seed},
               "measures": table_rows(table), "measure_seconds": time.perf_counter() - start,
               "rules": rules, "recommendation": rec}
    print(format_table(table))
    if args.search is not None:
        result = search(rec, net, train, held, base, len(table), args.search, args.device, args.seed)
        payload["advice"], payload["recommendation"] = rec, result["winner"]
        payload["search"] = result
        print(f"search: {result['candidates']} candidates, {result['epochs_spent']} epochs; winner "
              f"{100 * result['winner_held_out_acc']:.1f}% held-out")
    for key, value in payload["recommendation"].to_json().items():
        print(f"{key}: {value['value']}  # {value['reason']}")
    print(f"-> {write_advice(args.out, payload)}")
    return 0
