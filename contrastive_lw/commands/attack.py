"""``contrastive-lw attack``: accuracy of a transfer run's classifier under FGSM and PGD."""
from __future__ import annotations

import argparse

from .common import parse_str_list

HELP = ("adversarial examples (FGSM, PGD, L-inf) against transfer runs: accuracy per epsilon, a grid, "
        "mean ± std over seeds (--summary)")


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in parse_str_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", nargs="*",
                        help="`contrastive-lw transfer` output directories (frozen, finetune or linear mode)")
    parser.add_argument("--eps", type=_float_list, default=[8.0],
                        help="L-inf budgets in pixel levels (x/255), e.g. 1,2,4,8 (default 8)")
    parser.add_argument("--methods", type=parse_str_list, default=["fgsm", "pgd"], help="fgsm,pgd (default both)")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps (default 10)")
    parser.add_argument("--step-size", type=float, default=2.0, help="PGD step in pixel levels (default 2)")
    parser.add_argument("--no-random-start", action="store_true", help="PGD from the clean image")
    parser.add_argument("--images", type=int, default=1000,
                        help="attack N test images, class-balanced: the classes in turn (default 1000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default=None,
                        help="output directory of a single RUN (default RUN/attack): attack.json, attack_grid.png")
    parser.add_argument("--summary", default=None, metavar="FILE.json",
                        help="also write the mean and std over seeds of runs of the same init, mode and depth "
                             "to FILE.json and print them as a markdown table")
    parser.add_argument("--table", default=None, metavar="FILE.json",
                        help="only print the markdown table of a saved --summary file (no RUN, nothing attacked)")
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..attack import METHODS, attack_run, attack_table, save_attack_grid, summarize_attacks
    from ..data import balanced_limit
    from ..device import resolve_device
    from ..errors import ConfigError

    if args.table:
        if args.run_dir or not Path(args.table).is_file():
            raise ConfigError(f"--table prints a saved --summary file and takes no RUN; got {args.table!r} "
                              f"and {len(args.run_dir)} RUN(s)")
        print(attack_table(json.loads(Path(args.table).read_text())))
        return 0
    if not args.run_dir:
        raise ConfigError("attack needs at least one RUN (a transfer output directory), or --table FILE.json")
    if not all(e >= 0 for e in args.eps):
        raise ConfigError(f"--eps must be >= 0 pixel levels (8 means 8/255), got {args.eps}")
    epsilons = [e / 255 for e in args.eps]
    if not args.methods or set(args.methods) - set(METHODS):
        raise ConfigError(f"--methods must be among {list(METHODS)}, got {args.methods}")
    if args.images < 1 or args.batch_size < 1:
        raise ConfigError(f"--images and --batch-size must be positive, got {args.images} and {args.batch_size}")
    if args.out and len(args.run_dir) > 1:
        raise ConfigError("--out names the output of a single RUN; with several, each writes RUN/attack")
    options = {"step": args.step_size / 255, "steps": args.steps, "random_start": not args.no_random_start}
    tables = []
    for run_dir in args.run_dir:
        table, model, test = attack_run(run_dir, epsilons, args.methods, args.images, args.batch_size,
                                        resolve_device(args.device), **options)
        tables.append(table)
        out = Path(args.out or Path(run_dir) / "attack")
        out.mkdir(parents=True, exist_ok=True)
        (out / "attack.json").write_text(json.dumps(table, indent=1))
        shown = balanced_limit(test, 64)
        method = args.methods[-1]
        grid = save_attack_grid(model, shown.images, shown.labels, test.class_names, max(epsilons), method,
                                out / "attack_grid.png", **(options if method == "pgd" else {}))
        print(f"{run_dir}: clean accuracy {100 * table['clean']:.1f}% on {table['images']} test images "
              f"({', '.join(f'{n} {c}' for c, n in table['per_class'].items())})")
        for method in args.methods:
            print(f"  {method}: " + ", ".join(f"eps {e} {100 * a:.1f}%" for e, a in table[method].items()))
        print(f"  -> {out / 'attack.json'}, {grid}")
    if args.summary:
        summary = summarize_attacks(tables, args.run_dir)
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=1))
        print(attack_table(summary))
        print(f"-> {args.summary}")
    return 0
