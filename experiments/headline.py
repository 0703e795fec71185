"""Print README's headline table: the default layer-wise blocks against the supervised and random
baselines, read out linearly (``experiments/ablate.py`` rows) and frozen / fine-tuned
(``contrastive-lw transfer`` runs), mean ± std over every seed found, the best init of each column
in bold, and the seeds of each read-out.

    python experiments/headline.py --ablate runs/ablate/results.jsonl --transfers runs [--readouts linear,frozen]

An init's linear rows are the ``ablate.py`` rows of its ``--NAME-linear`` (a ``blocks_1..k``
accuracy each); its transfers are ``TRANSFERS/{frozen-cos,ft-cos}/RUN-kK-seedS/results.json`` for
the first of its ``--NAME-runs`` names that has a run of that k and seed (several names: the same
blocks trained under an earlier name, e.g. blocks 1-2 of a run whose block 3 differs).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

# table row -> (flag prefix, default ablate.py name, default transfer run names)
RUNS = {"layer-wise (unsupervised)": ("layerwise", "j200", "j200"),
        "supervised (classes 0-4)": ("supervised", "supervised-e5-nopool3", "supervised_nopool3"),
        "random init": ("random", "random-nopool3", "random_nopool3,random")}
INITS = tuple(RUNS)
READOUTS = {"linear": None, "frozen": "frozen-cos", "finetune": "ft-cos"}
DEPTHS = (1, 2, 3)


def linear_accuracies(results: Path, name: str) -> dict[int, dict[int, float]]:
    """k -> seed -> the all-block linear read-out (%) of blocks 1..k in ``name``'s ablation rows."""
    found: dict[int, dict[int, float]] = defaultdict(dict)
    for line in results.read_text().splitlines():
        row = json.loads(line)
        if row["name"] == name:
            for k in DEPTHS:
                key = "block_1" if k == 1 else f"blocks_1..{k}"
                if key in row["accs"]:
                    found[k][row["seed"]] = row["accs"][key]
    return found


def transfer_accuracies(folder: Path, names: list[str]) -> dict[int, dict[int, float]]:
    """k -> seed -> test accuracy (%) of the first of ``names`` with a run ``NAME-kK-seedS`` in ``folder``."""
    found: dict[int, dict[int, float]] = defaultdict(dict)
    for name in names:
        for path in sorted(folder.glob(f"{name}-k*-seed*/results.json")):
            match = re.fullmatch(rf"{re.escape(name)}-k(\d+)-seed(\d+)", path.parent.name)
            if match:
                k, seed = map(int, match.groups())
                found[k].setdefault(seed, 100 * json.loads(path.read_text())["records"][0]["test_acc"])
    return found


def table(cells: dict[tuple[str, str, int], list[float]], readouts: tuple[str, ...] = tuple(READOUTS)) -> str:
    """Markdown rows of INITS x (read-out, k) cells for ``readouts``, mean ± std, the best mean of each
    column in bold; a cell of fewer seeds than its column's most says how many it has."""
    columns = [(readout, k) for readout in readouts for k in DEPTHS]
    lines = ["| init | " + " | ".join(f"{readout} k={k}" for readout, k in columns) + " |",
             "|---|" + "---|" * len(columns)]
    means = {key: statistics.mean(xs) for key, xs in cells.items() if xs}
    for init in INITS:
        texts = []
        for column in columns:
            xs, most = cells[(init, *column)], max(len(cells[(other, *column)]) for other in INITS)
            text = f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else "–"
            if len(xs) > 1 and means[(init, *column)] == max(means.get((other, *column), 0) for other in INITS):
                text = f"**{text}**"
            texts.append(text + (f" ({len(xs)} seeds)" if 1 < len(xs) < most else ""))
        lines.append(f"| {init} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablate", type=Path, required=True, help="ablate.py's results.jsonl")
    parser.add_argument("--transfers", type=Path, required=True, help="folder of frozen-cos/ and ft-cos/")
    parser.add_argument("--readouts", default=",".join(READOUTS), help="comma-separated columns, of "
                        + ", ".join(READOUTS))
    for key, linear, runs in RUNS.values():
        parser.add_argument(f"--{key}-linear", default=linear)
        parser.add_argument(f"--{key}-runs", default=runs, help="comma-separated, first found wins")
    args = parser.parse_args()
    readouts = tuple(args.readouts.split(","))
    if not set(readouts) <= set(READOUTS):
        parser.error(f"--readouts takes {', '.join(READOUTS)}")
    cells: dict[tuple[str, str, int], list[float]] = {}
    seeds: dict[str, set[int]] = defaultdict(set)
    for init, (key, _, _) in RUNS.items():
        for readout in readouts:
            folder = READOUTS[readout]
            found = (linear_accuracies(args.ablate, getattr(args, f"{key}_linear")) if folder is None else
                     transfer_accuracies(args.transfers / folder, getattr(args, f"{key}_runs").split(",")))
            for k in DEPTHS:
                cells[(init, readout, k)] = [found[k][seed] for seed in sorted(found[k])]
                seeds[readout] |= set(found[k])
    print(table(cells, readouts))
    print("\nseeds: " + "; ".join(f"{readout} {', '.join(map(str, sorted(seeds[readout])))}" for readout in readouts))


if __name__ == "__main__":
    main()
