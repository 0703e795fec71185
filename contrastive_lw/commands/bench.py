"""``contrastive-lw bench``: measure speed and the layer-wise speed claim on this machine."""
from __future__ import annotations

import argparse

from .common import add_backbone_choice, add_config_arguments, backbone_settings, file_config, parse_int_list

HELP = "benchmark: matmul ceiling, per-layer throughput, data pipeline, layer-wise vs end-to-end, SimCLR peer"


# BenchConfig fields with a flag of their own (every field: --set bench.FIELD=VALUE)
_FIELD_FLAGS = (
    ("batch_sizes", parse_int_list,
     "per layer, for the throughput figures (default 2048,512; a GPU wants e.g. 32768,8192)"),
    ("probe_images", int,
     "target-class training images of the linear probe, half as many test images (default 2000; the real "
     "CIFAR-10 allows 10000)"),
    ("seeds", int, "pretraining seeds per race run, averaged (default 1; each one multiplies the race's time)"),
    ("paired_rounds", int,
     "re-time the two runs each race compares back to back this many times (default 3; 0: no re-timing): a "
     "time ratio the machine's drift between minutes hardly moves"),
    ("race_batch", int,
     "pretraining batch of the race and the SimCLR peer, both sides alike (default 512; a GPU wants several "
     "thousand)"),
    ("deeper_steps", float,
     "greedy's blocks 2..k train this fraction of block 1's steps (default 0.25; 1: the same steps for every "
     "block)"),
    ("resolution", float,
     "each side's time to the target: its first run reaching it, to this fraction of its steps (default "
     "0.125; each halving can add a run per side)"),
    ("race_depths", parse_int_list,
     "race only these depths, e.g. 4 (default: every block's; end-to-end still trains every block)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bench.json", help="JSON file for the figures")
    add_config_arguments(parser, "YAML with a bench section (BenchConfig's fields)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (about a minute on 2 CPU cores)")
    parser.add_argument("--race-only", action="store_true", default=None,
                        help="greedy vs end-to-end alone: no throughput figures, no SimCLR peer (needed for a "
                             "torchvision --backbone; its blocks: --set bench.backbone.blocks=N)")
    add_backbone_choice(parser)
    for field, kind, text in _FIELD_FLAGS:
        parser.add_argument("--" + field.replace("_", "-"), type=kind, default=None, help=text)
    parser.add_argument("--heldout-test", action="store_true",
                        help="also test the probe on the target classes' training images it does not train on "
                             "(never pretrained on either: 20 000 more on CIFAR-10 with --probe-images 10000, "
                             "half the probe's noise)")
    parser.add_argument("--dataset", default="sample", help="source of images (default: the bundled sample)")
    parser.add_argument("--source-classes", default="0-4", help="classes the race pretrains on (default 0-4)")
    parser.add_argument("--target-classes", default="5-9",
                        help="classes of the linear probe (default 5-9; swap the two to check a verdict on other data)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    import time
    from pathlib import Path

    from ..bench import BenchConfig, format_table, race_data, run_bench
    from ..config import from_dict, to_dict

    values = {**to_dict(BenchConfig.quick() if args.quick else BenchConfig()), **file_config(args, {"bench"}).get("bench", {})}
    flags = {field: getattr(args, field) for field, _, _ in _FIELD_FLAGS}
    flags.update(race_only=args.race_only, backbone=backbone_settings(args, values.get("backbone")))
    config = from_dict(BenchConfig, {**values, **{k: v for k, v in flags.items() if v is not None}}, "bench config")
    source, target, target_test = race_data(args.dataset, args.data_root, args.source_classes, args.target_classes,
                                            config.probe_images, args.heldout_test)
    start = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - start:5.0f} s] {message}", file=sys.stderr, flush=True)
    result = run_bench(source, target, target_test, config, args.device, say)
    result["setup"] = {"dataset": args.dataset, "source_classes": args.source_classes,
                       "target_classes": target.class_names, "source_images": len(source), "probe_train": len(target),
                       "probe_test": len(target_test), "heldout_test": args.heldout_test, "quick": args.quick}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(format_table(result))
    print(f"-> {args.out}")
    return 0
