"""``contrastive-lw transfer``: train a classifier on the first k blocks of an initialisation."""
from __future__ import annotations

import argparse

from .common import add_backbone_choice, add_data_arguments, add_run_arguments, backbone_settings, data_settings, file_config

HELP = "transfer the first k pretrained blocks into a classifier (frozen, finetune, linear, head2toe or svm)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", required=True,
                        help="run directory or layerK.pt (layer-wise, end-to-end or supervised), 'random' "
                             "(the --backbone net) or torchvision:NAME (with --weights)")
    add_backbone_choice(parser.add_argument_group("backbone of a 'random' or torchvision:NAME init"))
    add_data_arguments(parser, default="cifar10")
    add_run_arguments(parser, "output directory: config.yaml, metrics.jsonl, tb/, results.json")
    group = parser.add_argument_group("transfer (flags override --config)")
    group.add_argument("--layers", type=int, help="number of blocks transferred (k)")
    group.add_argument("--mode", choices=("frozen", "finetune", "linear", "head2toe", "svm"))
    group.add_argument("--epochs", type=int)
    group.add_argument("--batch-size", type=int)
    group.add_argument("--lr", type=float)
    group.add_argument("--lr-schedule", choices=("constant", "cosine"),
                       help="frozen / finetune / linear: constant lr (default) or cosine decay to 0 over the epochs")
    group.add_argument("--layer-lr-ratio", type=float, help="finetune: lr of transferred blocks = lr x this")
    group.add_argument("--l2sp", type=float, help="finetune: L2-SP strength towards the transferred weights")
    group.add_argument("--reinit", type=int, help="re-initialise this many blocks after the transferred ones")
    group.add_argument("--reinit-lr-ratio", type=float, help="lr of the re-initialised blocks = lr x this")
    group.add_argument("--l2", type=float, help="plain L2 strength on the new and re-initialised layers")
    group.add_argument("--advice", help="apply the recommendation of `contrastive-lw advise --out FILE` "
                       "(over --config, under the other flags)")
    group.add_argument("--pool", type=int, help="linear / svm: pool each block's map to this side")
    group.add_argument("--h2t-target", type=int, metavar="T",
                       help="head2toe: pool each layer's map to about T values (default 8192)")
    group.add_argument("--h2t-lambda", type=float, help="head2toe: group-lasso strength (default 1e-4)")
    group.add_argument("--h2t-keep", type=float, metavar="F",
                       help="head2toe: fraction of all layers' features kept (default 0.1)")
    group.add_argument("--h2t-units", action="store_true", default=None,
                       help="head2toe: read every residual unit inside the blocks too, not only each block's output")
    group.add_argument("--seed", type=int)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    import torch

    from ..backbones import BackboneConfig
    from ..config import from_dict, to_dict
    from ..data import load_dataset
    from ..distributed import is_main_process
    from ..errors import ConfigError
    from ..runs import RunLogger, prepare_run_dir
    from ..advise import read_advice
    from ..transfer import TransferConfig, load_init, train_transfer

    settings = file_config(args, {"data", "transfer", "backbone"})
    data = data_settings(args, settings.get("data"), default="cifar10")
    flags = {"layers": args.layers, "mode": args.mode, "epochs": args.epochs, "batch_size": args.batch_size,
             "lr": args.lr, "lr_schedule": args.lr_schedule, "layer_lr_ratio": args.layer_lr_ratio, "l2sp": args.l2sp, "pool": args.pool,
             "seed": args.seed, "reinit": args.reinit, "reinit_lr_ratio": args.reinit_lr_ratio,
             "l2": args.l2}
    advice = read_advice(args.advice).transfer_values() if args.advice else {}
    head2toe = {"target_size": args.h2t_target, "group_lasso": args.h2t_lambda, "keep_fraction": args.h2t_keep,
                "units": args.h2t_units}
    values = {**settings.get("transfer", {}), **advice, **{k: v for k, v in flags.items() if v is not None}}
    if any(v is not None for v in head2toe.values()):
        values["head2toe"] = {**values.get("head2toe", {}), **{k: v for k, v in head2toe.items() if v is not None}}
    config = TransferConfig.from_dict(values)
    train, test = (load_dataset(data["dataset"], split, data["data_root"], data["classes"], data["limit"],
                                data["download"]) for split in ("train", "test"))
    if train.labels is None or test.labels is None:
        raise ConfigError(f"transfer needs labelled data; {data['dataset']} has no labels")
    torch.manual_seed(config.seed)  # a random init is the same on every rank and every run
    backbone = from_dict(BackboneConfig, backbone_settings(args, settings.get("backbone")), "backbone")
    init, net = load_init(args.init, train.images, backbone=backbone)
    out = prepare_run_dir(args.out, {"init": str(args.init), "backbone": to_dict(backbone), "data": data,
                                     "transfer": to_dict(config)}, args.force)
    with RunLogger(out) as logger:
        result, _ = train_transfer(net, train, test, config, args.device, logger, out / "state.pt")
    record = {"init": init, "mode": config.mode, "layers": config.layers, "seed": config.seed,
              **dataclasses.asdict(result)}
    if is_main_process():
        (out / "results.json").write_text(json.dumps({"records": [record]}, indent=1))
        if result.head2toe_kept:
            from ..visualize import save_kept_features

            save_kept_features({init: result.head2toe_kept}, out / "figures" / "head2toe_kept.png",
                               f"Head2Toe: features kept per layer ({init} init)")
            print("head2toe kept " + ", ".join(f"{name} {kept}/{size}" for name, (kept, size)
                                               in result.head2toe_kept.items()))
    print(f"{init} init, {config.mode}, {config.layers} layer(s): test accuracy {100 * result.test_acc:.2f}% "
          f"(best epoch {result.best_epoch}) in {result.seconds:.0f} s -> {out}")
    return 0
