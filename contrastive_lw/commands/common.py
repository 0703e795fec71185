"""Arguments shared by several commands: data source, device, output, config file."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_data_arguments(parser: argparse.ArgumentParser, default: str = "sample") -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default=None,
                       help=f"cifar10, cifar100, sample (bundled, offline), folder:PATH or npz:PATH (default {default})")
    group.add_argument("--data-root", default=None,
                       help="folder holding the dataset (default: $CONTRASTIVE_LW_DATA, else "
                            "~/.cache/contrastive_lw/datasets)")
    group.add_argument("--classes", default=None, help="keep these classes, e.g. 0-4 or cat,dog")
    group.add_argument("--limit", type=int, default=None, help="use the first N images (class-balanced)")
    group.add_argument("--download", action="store_true", default=None,
                       help="let torchvision download CIFAR-10/100 into --data-root")


def add_run_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("--out", required=True, help=out_help)
    add_config_arguments(parser)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--force", action="store_true",
                        help="continue in --out even if its saved config differs")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str = "YAML file of settings") -> None:
    parser.add_argument("--config", default=None, help=f"{config_help}; --set and flags override it")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="override any setting of the config file, e.g. pretrain.loss.temperature=0.2 "
                             "(VALUE read as YAML: 0.2, [64, 128], true); repeatable")


def file_config(args: argparse.Namespace, sections: set[str] | None = None,
                default: Path | None = None) -> dict[str, Any]:
    """The ``--config`` YAML (else ``default``, else empty) with every ``--set`` override on top; with
    ``sections``, a top-level key outside them is a ConfigError naming the valid ones. The
    result goes to :func:`contrastive_lw.config.from_dict`, which checks every key and value."""
    from ..config import load_yaml, set_dotted

    path = args.config or default
    values = load_yaml(path) if path else {}
    for override in args.overrides:
        set_dotted(values, override)
    unknown = sorted(set(values) - sections) if sections is not None else []
    if unknown:
        from ..errors import ConfigError

        raise ConfigError(f"unknown section(s) {unknown} in {args.config or '--set'}; valid: {sorted(sections)}")
    return values


def data_settings(args: argparse.Namespace, saved: dict[str, Any] | None, default: str = "sample") -> dict[str, Any]:
    """The ``data`` section: config-file values overridden by the flags that were given."""
    values = {"dataset": default, "data_root": None, "classes": None, "limit": None, "download": False}
    values.update(saved or {})
    for key in values:
        flag = getattr(args, key, None)
        if flag is not None:
            values[key] = flag
    return values


BACKBONE_HELP = ("lw (default: the project's conv net, shaped by --widths), resnet18, resnet50, vgg11_bn, "
                 "vgg16_bn or mobilenet_v3_small (torchvision)")


def add_backbone_choice(parser: argparse.ArgumentParser | argparse._ArgumentGroup, backbone: bool = True) -> None:
    """--backbone (unless ``backbone`` is False), --cifar-stem, --weights: which network, how built."""
    if backbone:
        parser.add_argument("--backbone", help=BACKBONE_HELP)
    parser.add_argument("--cifar-stem", action="store_true", default=None,
                        help="torchvision nets: a 3x3 stride-1 stem for 32x32 images instead of ImageNet's")
    parser.add_argument("--weights", help="torchvision nets: none (default), DEFAULT, a weights name such as "
                                          "IMAGENET1K_V1 (from the torch hub cache, $TORCH_HOME) or a state-dict file")


def backbone_settings(args: argparse.Namespace, saved: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``backbone`` config section: saved values with the flags that were given on top; an
    ``--init torchvision:NAME`` names the network."""
    from ..backbones import TORCHVISION_PREFIX

    values = dict(saved or {})
    init = str(getattr(args, "init", "") or "")
    if init.startswith(TORCHVISION_PREFIX):
        values["name"] = init[len(TORCHVISION_PREFIX):]
    flags = {"name": getattr(args, "backbone", None), "cifar_stem": args.cifar_stem, "weights": args.weights}
    values.update({k: v for k, v in flags.items() if v is not None})
    return values


def parse_int_list(text: str) -> list[int]:
    """``"64,128"`` -> [64, 128]."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_float_list(text: str) -> list[float]:
    """``"4,1"`` -> [4.0, 1.0]."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_backbone_arguments(parser: argparse.ArgumentParser, layers_default: str | None = "1") -> None:
    """--init (with --backbone, --cifar-stem, --weights), --layers, --pool, --split, --batch-size,
    --device, --no-progress: the features of blocks of a backbone over one split of a dataset."""
    parser.add_argument("--init", required=True,
                        help="run directory or layerK.pt (layer-wise, end-to-end or supervised), 'random' "
                             "(the --backbone net) or torchvision:NAME")
    add_backbone_choice(parser)
    parser.add_argument("--layers", type=parse_int_list, default=layers_default,
                        help=f"blocks whose pooled outputs are concatenated, e.g. 1,2 (default {layers_default})")
    parser.add_argument("--pool", type=int, default=4, help="pool each block's map to this side (default 4)")
    parser.add_argument("--split", choices=("train", "test"), default="test")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def load_split_and_backbone(args: argparse.Namespace, data: dict[str, Any]):
    """(the ``args.split`` images of ``data``, the ``args.init`` backbone on ``args.device`` (a
    'random' one drawn with seed 0), the checked layers)."""
    from ..backbones import BackboneConfig
    from ..config import from_dict
    from ..data import load_dataset
    from ..device import resolve_device
    from ..errors import ConfigError
    from ..features import check_layers
    from ..transfer import load_init

    if args.pool < 1 or args.batch_size < 1:
        raise ConfigError(f"--pool and --batch-size must be positive, got {args.pool} and {args.batch_size}")
    images = load_dataset(data["dataset"], args.split, data["data_root"], data["classes"], data["limit"],
                          data["download"])
    import torch

    torch.manual_seed(0)  # a 'random' init is the same network every time
    backbone = from_dict(BackboneConfig, backbone_settings(args), "backbone")
    net = load_init(args.init, images.images, backbone=backbone)[1].to(resolve_device(args.device))
    return images, net, check_layers(net, args.layers)
