"""Race runs with settings the bench keeps fixed: each side's learning rate, greedy's steps per block.

Each ``--runs`` entry is ``MODE:LR:STEPS`` (``greedy:0.003:1800,450`` trains block 1 for 1 800
steps and block 2 for 450; ``end2end:0.001:1200`` the whole network for 1 200), pretrained on the
bench's images with its loss and batch (blocks 64, 128; InfoNCE; 512) for seeds 0..``--seeds``-1,
then probed on blocks 1 and 1-2 as the bench does. Writes each run's mean time, mean accuracies and
each seed's accuracies to ``--out``::

    python experiments/race_settings.py --data-root ../shared/data --heldout-test --seeds 2 \\
        --runs greedy:0.001:1800,450 end2end:0.001:1200 --out runs/race_settings.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from contrastive_lw.bench import RACE_LOSS, BenchConfig, over_seeds, race_data
from contrastive_lw.memory import keep_freed_memory
from contrastive_lw.pretrain import MODES, PretrainConfig


def parse_run(text: str) -> tuple[str, float, tuple[int, ...]]:
    """``MODE:LR:STEPS`` -> (mode, lr, steps per layer)."""
    try:
        mode, lr, steps = text.split(":")
        parsed = mode, float(lr), tuple(int(s) for s in steps.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MODE:LR:STEPS such as greedy:0.003:1800,450, got {text!r}") from None
    if mode not in MODES:
        raise argparse.ArgumentTypeError(f"mode must be one of {list(MODES)}, got {mode!r}")
    return parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=parse_run, nargs="+", required=True, help="MODE:LR:STEPS, one per run")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--source-classes", default="0-4")
    parser.add_argument("--target-classes", default="5-9")
    parser.add_argument("--probe-images", type=int, default=10000)
    parser.add_argument("--heldout-test", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="race_settings.json")
    args = parser.parse_args()
    keep_freed_memory()
    bench = BenchConfig()
    source, target, target_test = race_data(args.dataset, args.data_root, args.source_classes, args.target_classes,
                                            args.probe_images, args.heldout_test)
    base = PretrainConfig(arch=bench.arch, loss=RACE_LOSS, batch_size=bench.race_batch, log_every=10 ** 9)
    depths = range(1, bench.arch.num_blocks + 1)
    results = []
    for mode, lr, steps in args.runs:
        config = dataclasses.replace(base, mode=mode, lr=lr, steps_per_layer=steps)
        seconds, accs, seed_accs = over_seeds(config, args.seeds, source, target, target_test, args.device, depths)
        results.append({"mode": mode, "lr": lr, "steps_per_layer": list(steps), "seconds": seconds,
                        "acc_by_depth": accs, "seed_accs_by_depth": seed_accs})
        print(f"{mode} lr {lr} steps {','.join(map(str, steps))}: {seconds:.1f} s, probe "
              + " / ".join(f"{100 * a:.2f}%" for a in accs), file=sys.stderr, flush=True)
    setup = {key: getattr(args, key) for key in ("dataset", "source_classes", "target_classes", "probe_images",
                                                  "heldout_test", "seeds")}
    Path(args.out).write_text(json.dumps({"setup": setup, "runs": results}, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
