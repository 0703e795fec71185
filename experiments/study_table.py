"""Print a study's ``results.json`` (written by ``contrastive-lw compare``) as one markdown table:
a row per (init, mode), a column per number of transferred blocks k, mean ± std over seeds (%).

    python experiments/study_table.py runs/resnet18-quick/results.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from contrastive_lw.study import summarize


def pivot(records: list[dict]) -> str:
    """The markdown table of :func:`contrastive_lw.study.summarize` with k as columns."""
    summary = summarize(records)
    depths = sorted({k for _, _, k in summary})
    rows = list(dict.fromkeys((init, mode) for init, mode, _ in summary))
    lines = ["| init | mode | " + " | ".join(f"k={k}" for k in depths) + " | seeds |",
             "|---|---|" + "---|" * len(depths) + "---|"]
    for init, mode in rows:
        cells = [summary.get((init, mode, k)) for k in depths]
        text = [f"{100 * c[0]:.1f} ± {100 * c[1]:.1f}" if c and c[2] > 1 else f"{100 * c[0]:.1f}" if c else "–"
                for c in cells]
        seeds = max(c[2] for c in cells if c)
        lines.append(f"| {init} | {mode} | " + " | ".join(text) + f" | {seeds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a study's results.json")
    print(pivot(json.loads(parser.parse_args().results.read_text())["records"]))


if __name__ == "__main__":
    main()
