"""Run the benchmark: ``python experiments/bench.py [--quick] [--out bench.json]`` (same as
``contrastive-lw bench``)."""
import sys

from contrastive_lw.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
