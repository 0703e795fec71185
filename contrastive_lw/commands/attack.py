"""``contrastive-lw attack``: accuracy of a transfer run's classifier under FGSM and PGD."""
from __future__ import annotations

import argparse

from .common import parse_str_list

HELP = "adversarial examples (FGSM, PGD, L-inf) against a transfer run: accuracy per epsilon and a grid"


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in parse_str_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="a `contrastive-lw transfer` output directory "
                                                       "(frozen, finetune or linear mode)")
    parser.add_argument("--eps", type=_float_list, default=[8.0],
                        help="L-inf budgets in pixel levels (x/255), e.g. 1,2,4,8 (default 8)")
    parser.add_argument("--methods", type=parse_str_list, default=["fgsm", "pgd"], help="fgsm,pgd (default both)")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps (default 10)")
    parser.add_argument("--step-size", type=float, default=2.0, help="PGD step in pixel levels (default 2)")
    parser.add_argument("--no-random-start", action="store_true", help="PGD from the clean image")
    parser.add_argument("--images", type=int, default=1000,
                        help="attack N test images, class-balanced (default 1000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default=None, help="output directory (default RUN/attack): attack.json, attack_grid.png")
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..attack import METHODS, load_transfer_model, robustness, save_attack_grid
    from ..data import balanced_limit
    from ..device import resolve_device
    from ..errors import ConfigError

    if not all(e >= 0 for e in args.eps):
        raise ConfigError(f"--eps must be >= 0 pixel levels (8 means 8/255), got {args.eps}")
    epsilons = [e / 255 for e in args.eps]
    if not args.methods or set(args.methods) - set(METHODS):
        raise ConfigError(f"--methods must be among {list(METHODS)}, got {args.methods}")
    if args.images < 1 or args.batch_size < 1:
        raise ConfigError(f"--images and --batch-size must be positive, got {args.images} and {args.batch_size}")
    model, test = load_transfer_model(args.run_dir, resolve_device(args.device))
    test = balanced_limit(test, args.images)  # the first N of a folder would be one or two classes
    images, labels = test.images, test.labels
    options = {"step": args.step_size / 255, "steps": args.steps, "random_start": not args.no_random_start}
    result = robustness(model, images, labels, epsilons, args.methods, args.batch_size, **options)
    out = Path(args.out or Path(args.run_dir) / "attack")
    out.mkdir(parents=True, exist_ok=True)
    table = {"clean": result["clean"], "images": len(images), "pgd_options": options,
             **{m: {f"{255 * e:g}/255": a for e, a in result[m].items()} for m in args.methods}}
    (out / "attack.json").write_text(json.dumps(table, indent=1))
    shown = balanced_limit(test, 64)
    grid = save_attack_grid(model, shown.images, shown.labels, test.class_names, max(epsilons),
                            args.methods[-1], out / "attack_grid.png", **(options if args.methods[-1] == "pgd" else {}))
    print(f"clean accuracy {100 * result['clean']:.1f}% on {len(images)} test images")
    for method in args.methods:
        print(f"{method}: " + ", ".join(f"eps {255 * e:g}/255 {100 * a:.1f}%" for e, a in result[method].items()))
    print(f"-> {out / 'attack.json'}, {grid}")
    return 0
