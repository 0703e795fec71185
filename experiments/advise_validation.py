"""The advised transfer setting against the best cell of an exhaustive small grid, both trained in
full and scored on the target's test set, per initialisation.

The advice (``contrastive_lw.advise.recommend`` on ``contrastive_lw.fit.fit_table``) sees only the
target's training set (fit / held-out split); the grid is k x mode x transferred LR ratio x
L2-SP x re-initialised blocks. Writes every cell, the advice, its measures and the times to
``--out``::

    python experiments/advise_validation.py --data-root ../shared/data --classes 5-9 --limit 2500 \\
        --init layerwise=runs/lw random --epochs 4 --out runs/advise_validation.json
    # after a change of the rules: the same grid, only the advice trained again
    python experiments/advise_validation.py ... --grid-from runs/advise_validation.json --out runs/v2.json
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time

import torch
from contrastive_lw.advise import recommend
from contrastive_lw.data import load_dataset
from contrastive_lw.fit import fit_table, split_train, table_rows
from contrastive_lw.model import ArchConfig
from contrastive_lw.transfer import TransferConfig, load_init, train_transfer


def grid(depth: int) -> list[dict]:
    """Every (layers, mode, reinit, transferred LR ratio, L2-SP) cell; L2 0.0005 on new layers."""
    cells = []
    for k, reinit in ((k, r) for k in range(1, depth + 1) for r in range(depth - k + 1)):
        cells.append({"layers": k, "reinit": reinit, "mode": "frozen", "layer_lr_ratio": 1.0, "l2sp": 0.0})
        for ratio, l2sp in itertools.product((0.1, 1.0), (0.0, 0.01)):
            cells.append({"layers": k, "reinit": reinit, "mode": "finetune", "layer_lr_ratio": ratio, "l2sp": l2sp})
    return [{**c, "l2": 5e-4} for c in cells]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", nargs="+", required=True, help="NAME=RUN_DIR, or 'random'")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--classes", default="5-9")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--random-widths", default="64,128", help="block widths of the random init")
    parser.add_argument("--out", required=True)
    parser.add_argument("--grid-from", default=None,
                        help="an earlier --out: reuse its grid cells (same data, epochs), train only the advice")
    args = parser.parse_args()
    train = load_dataset("cifar10", "train", args.data_root, args.classes, args.limit)
    test = load_dataset("cifar10", "test", args.data_root, args.classes, args.limit)
    base = TransferConfig(epochs=args.epochs, new_widths=(64,), hidden=128)
    results, earlier = [], {}
    if args.grid_from:
        with open(args.grid_from) as f:
            earlier = {r["init"]: r["cells"] for r in json.load(f)}
    for spec in args.init:
        name, _, path = spec.partition("=")
        widths = tuple(int(w) for w in args.random_widths.split(","))
        torch.manual_seed(1)  # the random init: not fit_table's random-weight baseline (seed 0)
        _, net = load_init(path or name, train.images, ArchConfig(widths=widths))
        start = time.perf_counter()
        table = fit_table(net, *split_train(train))
        rec = recommend(table, len(train) / len(train.class_names))
        measure_s = time.perf_counter() - start
        cells = []
        for cell in [] if name in earlier else grid(net.num_blocks):
            result, _ = train_transfer(net, train, test, dataclasses.replace(base, **cell), "cpu")
            cells.append({**cell, "test_acc": result.test_acc, "seconds": result.seconds})
            print(name, cell, f"{100 * result.test_acc:.1f}", flush=True)
        cells = cells or earlier[name]
        result, _ = train_transfer(net, train, test, dataclasses.replace(base, **rec.transfer_values()), "cpu")
        best = max(cells, key=lambda c: c["test_acc"])
        grid_s = sum(c["seconds"] for c in cells)
        results.append({"init": name, "target": args.classes, "train_images": len(train), "test_images": len(test),
                        "epochs": args.epochs, "measures": table_rows(table), "advice": rec.to_json(),
                        "advised_acc": result.test_acc, "advised_s": result.seconds, "measure_s": measure_s,
                        "grid_best": best, "grid_s": grid_s, "cells": cells,
                        "gap_points": 100 * (best["test_acc"] - result.test_acc),
                        "cost_fraction": (measure_s + result.seconds) / grid_s})
        print(name, "advised", rec.transfer_values(), f"{100 * result.test_acc:.1f} vs grid best "
              f"{100 * best['test_acc']:.1f}; cost {results[-1]['cost_fraction']:.2f} of the grid", flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
