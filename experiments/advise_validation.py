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
    # the Markdown tables of docs/STUDY.md and the figure of fit against gain, from one or more --out files
    python experiments/advise_validation.py --report runs/val_59.json runs/val_04.json \\
        --figure docs/figures/advise_fit_vs_gain.png
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


def _setting(cell: dict) -> str:
    values = {"layer_lr_ratio": cell.get("layer_lr_ratio"), **cell}
    return (f"k={values['layers']} {values['mode']} reinit={values['reinit']} lr×{values['layer_lr_ratio']:g} "
            f"l2sp={values['l2sp']:g}")


def report(results: list[dict]) -> str:
    """The validation table (advised vs the grid's best, per target and init), the fit measures and
    the verdict against the issue's goals (within 1 point, <= 1/5 of the grid's cost), in Markdown."""
    lines = ["| target | init | advised | test % | grid best | test % | best - advised (points) | advised's rank "
             "| cost: measures + advised run / grid |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        advised = {k: v["value"] for k, v in r["advice"].items()}
        advised["layer_lr_ratio"] = advised["lr_ratios"]["transferred"]
        rank = 1 + sum(c["test_acc"] > r["advised_acc"] for c in r["cells"])
        lines.append(f"| {r['target']} | {r['init']} | {_setting(advised)} | {100 * r['advised_acc']:.1f} | "
                     f"{_setting(r['grid_best'])} | {100 * r['grid_best']['test_acc']:.1f} | {r['gap_points']:+.1f} | "
                     f"{rank} of {len(r['cells']) + 1} | {r['measure_s']:.0f} + {r['advised_s']:.0f} s / "
                     f"{r['grid_s']:.0f} s = {r['cost_fraction']:.2f} |")
    lines += ["", "| target | init | block | kNN % (random) | kNN gain (s.e.) | linear % (random) | LogME (random) "
              "| Head2Toe kept |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for m in r["measures"]:
            lines.append(f"| {r['target']} | {r['init']} | {m['block']} | {100 * m['knn']:.1f} ({100 * m['knn_random']:.1f}) "
                         f"| {100 * m['knn_gain']:+.1f} ({100 * m['knn_gain_se']:.1f}) = "
                         f"{m['knn_gain'] / m['knn_gain_se']:+.1f} s.e. | {100 * m['linear']:.1f} "
                         f"({100 * m['linear_random']:.1f}) | {m['logme']:.3f} ({m['logme_random']:.3f}) | "
                         f"{100 * m['head2toe_kept']:.0f}% |")
    within = sum(r["gap_points"] <= 1 for r in results)
    cheap = sum(r["cost_fraction"] <= 0.2 for r in results)
    gaps = ", ".join(f"{r['gap_points']:+.1f}" for r in results)
    points = [p for p in gain_points(results) if p["init"] != "random"]
    if len(points) > 2:
        from scipy.stats import spearmanr

        rho = spearmanr([p["fit"] for p in points], [p["gain"] for p in points])
        lines += ["", f"Fit (kNN gain over random weights) vs test gain over the random init, the {len(points)} "
                  f"pretrained (target, init, k) points: Spearman rho {rho.statistic:.2f} (p = {rho.pvalue:.2f}); "
                  f"test gains {min(p['gain'] for p in points) * 100:+.1f} to {max(p['gain'] for p in points) * 100:+.1f} points."]
    lines += ["", f"Within 1 point of the grid's best: {within} of {len(results)} (gaps {gaps}); at <= 1/5 of the grid's cost: {cheap} of "
              f"{len(results)} (mean fraction {sum(r['cost_fraction'] for r in results) / len(results):.2f})."]
    return "\n".join(lines)


def gain_points(results: list[dict]) -> list[dict]:
    """One point per (target, init, k): block k's kNN gain over random weights (and its s.e.) against
    the test accuracy gain over the random init, best grid cell with k transferred blocks for each."""
    def best(result: dict, k: int) -> float:
        return max(c["test_acc"] for c in result["cells"] if c["layers"] == k)

    randoms = {r["target"]: r for r in results if r["init"] == "random"}
    points = []
    for r in results:
        for m in r["measures"]:
            if r["target"] in randoms:
                points.append({"target": r["target"], "init": r["init"], "k": m["block"], "fit": m["knn_gain"],
                               "fit_se": m["knn_gain_se"],
                               "gain": best(r, m["block"]) - best(randoms[r["target"]], m["block"])})
    return points


def figure(results: list[dict], path: str) -> None:
    """Fit measure (kNN gain over random weights, +- 1 s.e.) against the accuracy gain over the
    random init, one point per (target, init, k)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    markers, colours = {"layerwise": "o", "supervised": "s", "random": "^"}, {}
    for p in gain_points(results):
        colour = colours.setdefault(p["target"], f"C{len(colours)}")
        ax.errorbar(100 * p["fit"], 100 * p["gain"], xerr=100 * p["fit_se"], fmt=markers.get(p["init"], "D"),
                    color=colour, capsize=3, label=f"{p['init']}, target {p['target']}")
        ax.annotate(f"k={p['k']}", (100 * p["fit"], 100 * p["gain"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("fit: kNN accuracy of blocks 1..k over random weights (points, ±1 s.e.)")
    ax.set_ylabel("test accuracy over the random init (points;\nbest grid cell with k blocks each)")
    ax.set_title("Fit measure vs accuracy gain over random init (random: 0 by definition)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", nargs="+", default=None, metavar="JSON",
                        help="print the Markdown tables from these --out files (nothing is trained)")
    parser.add_argument("--figure", default=None, help="with --report: the fit-vs-gain figure to write")
    parser.add_argument("--init", nargs="+", help="NAME=RUN_DIR, or 'random'")
    parser.add_argument("--data-root")
    parser.add_argument("--classes", default="5-9")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--random-widths", default="64,128", help="block widths of the random init")
    parser.add_argument("--out")
    parser.add_argument("--grid-from", default=None,
                        help="an earlier --out: reuse its grid cells (same data, epochs), train only the advice")
    args = parser.parse_args()
    if args.report:
        results = [r for path in args.report for r in json.load(open(path))]
        print(report(results))
        if args.figure:
            figure(results, args.figure)
        return
    if not (args.init and args.data_root and args.out):
        parser.error("--init, --data-root and --out are required (or --report)")
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
