"""Training-loop time and page faults with glibc's default ``malloc`` against
:func:`contrastive_lw.keep_freed_memory`, in separate processes, alternating. Writes JSON::

    python experiments/allocator_timing.py --out allocator_timing.json [--rounds 3]
        [--dataset cifar10 --data-root ../shared/data]

Each process measures the bench race's pretraining runs (blocks 64, 128; InfoNCE; batch 512):
greedy (``--steps`` per layer) and end-to-end (``--steps``), and one fine-tuning epoch of the
transfer classifier on up to 5 000 images of classes 5-9 (batch 128, then its test pass); times
are per step (per batch for the fine-tuning epoch, its test pass included).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from contrastive_lw.memory import KEEP_FREED_MEMORY_ENV


def measure(dataset: str, data_root: str | None, steps: int) -> dict[str, float]:
    """Milliseconds and minor page faults per step of each loop, in this process."""
    import torch

    from contrastive_lw import keep_freed_memory
    from contrastive_lw.bench import BenchConfig
    from contrastive_lw.data import load_dataset
    from contrastive_lw.losses import LossConfig
    from contrastive_lw.model import LayerwiseNet
    from contrastive_lw.pretrain import LayerwisePretrainer, PretrainConfig
    from contrastive_lw.transfer import TransferConfig, train_transfer

    keep_freed_memory()
    source = load_dataset(dataset, "train", data_root, "0-4").images
    arch = BenchConfig().arch
    base = PretrainConfig(arch=arch, loss=LossConfig(name="infonce"), lr=0.003, batch_size=512,
                          log_every=10 ** 9, steps_per_layer=steps)
    result = {}

    def timed(name: str, run, count: int) -> None:
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        run()
        result[f"{name}_ms_per_step"] = (time.perf_counter() - start) / count * 1e3
        result[f"{name}_faults_per_step"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / count

    for mode in ("greedy", "end2end"):
        config = dataclasses.replace(base, mode=mode)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = LayerwisePretrainer(config, tmp, "cpu", progress=False, tensorboard=False)
            timed(mode, lambda: trainer.fit(source), steps * (arch.num_blocks if mode == "greedy" else 1))
    train = load_dataset(dataset, "train", data_root, "5-9", 5000)
    test = load_dataset(dataset, "test", data_root, "5-9", 1000)
    transfer = TransferConfig(mode="finetune", layers=2, epochs=1, batch_size=128)
    torch.manual_seed(0)
    net = LayerwiseNet(arch)
    net.set_normalization(train.images)
    timed("finetune_epoch", lambda: train_transfer(net, train, test, transfer, "cpu"), -(-len(train.images) // 128))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="allocator_timing.json")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--dataset", default="sample")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.dataset, args.data_root, args.steps)))
        return
    runs: dict[str, list[dict]] = {"default": [], "keep_freed_memory": []}
    child = [sys.executable, __file__, "--child", "--steps", str(args.steps), "--dataset", args.dataset,
             *(["--data-root", args.data_root] if args.data_root else [])]
    for _ in range(args.rounds):
        for name, keep in (("default", "0"), ("keep_freed_memory", "1")):
            out = subprocess.run(child, env={**os.environ, KEEP_FREED_MEMORY_ENV: keep},
                                 capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.splitlines()[-1]))
            print(name, runs[name][-1], file=sys.stderr, flush=True)
    medians = {name: {key: statistics.median(run[key] for run in values) for key in values[0]}
               for name, values in runs.items()}
    for key in medians["default"]:
        if key.endswith("_ms_per_step"):
            loop = key.removesuffix("_ms_per_step")
            print(f"{loop:>15}: {medians['default'][key]:6.1f} -> {medians['keep_freed_memory'][key]:6.1f} ms per step "
                  f"({medians['default'][key] / medians['keep_freed_memory'][key]:.2f}x), page faults "
                  f"{medians['default'][loop + '_faults_per_step']:.0f} -> "
                  f"{medians['keep_freed_memory'][loop + '_faults_per_step']:.0f}")
    from contrastive_lw.bench import describe_device
    import torch

    Path(args.out).write_text(json.dumps({"device": describe_device(torch.device("cpu")), "steps": args.steps,
                                          "dataset": args.dataset, "medians": medians, "runs": runs}, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
