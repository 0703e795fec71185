"""Arguments shared by several commands: data source, device, output, config file."""
from __future__ import annotations

import argparse
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
    parser.add_argument("--config", default=None, help="YAML file of settings; flags override it")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--force", action="store_true",
                        help="continue in --out even if its saved config differs")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def data_settings(args: argparse.Namespace, saved: dict[str, Any] | None, default: str = "sample") -> dict[str, Any]:
    """The ``data`` section: config-file values overridden by the flags that were given."""
    values = {"dataset": default, "data_root": None, "classes": None, "limit": None, "download": False}
    values.update(saved or {})
    for key in values:
        flag = getattr(args, key, None)
        if flag is not None:
            values[key] = flag
    return values


def parse_int_list(text: str) -> list[int]:
    """``"64,128"`` -> [64, 128]."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]
