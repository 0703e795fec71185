"""``contrastive-lw compare``: the whole transfer study from one config, with report and figures."""
from __future__ import annotations

import argparse

from .common import add_backbone_choice, add_config_arguments, file_config

HELP = "run the transfer study (inits x modes x layers x seeds) and write results.json, report.md, figures/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="study directory (re-running resumes it)")
    add_config_arguments(parser, "study YAML (default: the CPU-sized quick study on the bundled sample, "
                                 "experiments/configs/quick.yaml)")
    parser.add_argument("--data-root", default=None, help="overrides data_root of the config")
    parser.add_argument("--download", action="store_true", help="let torchvision download CIFAR")
    parser.add_argument("--no-pool1", action="store_true", help="block 1 without max-pool (pooling ablation)")
    add_backbone_choice(parser.add_argument_group("backbone (overrides pretrain.backbone of the config; a "
                                                  "torchvision net is built up to the deepest of the study's layers)"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--force", action="store_true", help="continue in --out even if its config differs")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--ensemble", type=int, default=1, metavar="N",
                        help="train up to N frozen / fine-tune runs of one mode and depth at once as one batched "
                             "model (the inits and seeds of the grid; same results as separate runs; for GPUs, "
                             "default 1: one at a time)")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..config import to_dict
    from ..errors import ConfigError
    from ..runs import prepare_run_dir
    from ..study import DEFAULT_STUDY, Study, StudyConfig, summarize

    if args.config is None and not DEFAULT_STUDY.is_file():
        raise ConfigError(f"the default study {DEFAULT_STUDY} ships with the source checkout only: "
                          "pass --config with a study YAML")
    config = StudyConfig.from_dict(file_config(args, default=DEFAULT_STUDY))
    if args.data_root:
        config = dataclasses.replace(config, data_root=args.data_root)
    config = with_backbone(config, args)
    if args.no_pool1:
        arch = config.pretrain.arch.without_first_pool()
        config = dataclasses.replace(config, pretrain=dataclasses.replace(config.pretrain, arch=arch))
    if args.ensemble < 1:
        raise ConfigError(f"--ensemble must be a positive integer, got {args.ensemble}")
    study = Study(config, args.out, args.device, False if args.no_progress else None, args.download, args.ensemble)
    data = study.load_data()
    out = prepare_run_dir(args.out, {"study": to_dict(config)}, args.force)
    records = study.run(data)
    for (init, mode, k), (mean, std, n) in summarize(records).items():
        print(f"{init:>10} {mode:>8} k={k}: {100 * mean:5.1f} ± {100 * std:.1f} % ({n} seeds)")
    print(f"report: {out / 'report.md'}")
    return 0


def with_backbone(config, args: argparse.Namespace):
    """``config`` with the --backbone / --cifar-stem / --weights flags applied to its pretraining
    section; a torchvision net gets as many blocks as the study transfers."""
    import dataclasses

    from ..backbones import BackboneConfig
    from ..config import from_dict, to_dict
    from .common import backbone_settings

    values = backbone_settings(args, to_dict(config.pretrain.backbone))
    if values.get("name", "lw") != "lw" and not values.get("blocks"):
        values["blocks"] = max(config.layers)
    backbone = from_dict(BackboneConfig, values, "backbone")
    return dataclasses.replace(config, pretrain=dataclasses.replace(config.pretrain, backbone=backbone))
