"""The cosine triplet loss's C kernel (``losses._CosineTriplet``, since 2026-12-03) against its
PyTorch path: forward + backward of the loss alone, and the greedy layer-1 training step
(``contrastive_lw.bench.layer_step``, batch 2048, the bench's layer-1 figure) with each, with its
fraction of the float32 matmul ceiling timed beside it, in alternating rounds (this machine's
speed drifts between minutes). CPU only. Writes JSON::

    python experiments/triplet_timing.py --out runs/triplet_timing.json [--rounds 6]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import median

import torch

from contrastive_lw import native
from contrastive_lw.bench import describe_device, layer_step, matmul_step, wall_seconds
from contrastive_lw.losses import TripletLoss
from contrastive_lw.memory import keep_freed_memory
from contrastive_lw.model import ArchConfig, LayerwiseNet

STEPS, MATMULS = 20, 5


def seconds(call, repeats: int) -> float:
    """Mean time of ``call()`` over ``repeats`` calls on the CPU, after one more."""
    call()
    return wall_seconds(call, repeats, torch.device("cpu")) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="triplet_timing.json")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2048, help="triplets per step")
    args = parser.parse_args()
    keep_freed_memory()
    kernel, device = native.cosine_triplet_kernel, torch.device("cpu")
    if kernel() is None:
        raise SystemExit("the C kernel cannot be built here: nothing to compare")
    embeddings = torch.randn(3 * args.batch, 128, requires_grad=True)
    loss = TripletLoss()
    step, patches, flops = layer_step(LayerwiseNet(ArchConfig()), 1, args.batch, device)
    matmul, matmul_flops = matmul_step(device)
    paths = {"pytorch": lambda: None, "kernel": kernel}
    rounds: dict[str, list[dict]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, loader in paths.items():
            native.cosine_triplet_kernel = loader
            loss_s = seconds(lambda: loss(*embeddings.chunk(3)).backward(), STEPS)
            ceiling = matmul_flops / seconds(matmul, MATMULS)
            step_s = seconds(step, STEPS)
            rounds[name].append({"loss_ms": loss_s * 1e3, "step_ms": step_s * 1e3,
                                 "fraction_of_matmul": flops / step_s / ceiling})
    native.cosine_triplet_kernel = kernel
    summary = {name: {key: median(r[key] for r in runs) for key in runs[0]} for name, runs in rounds.items()}
    for name, figures in summary.items():
        print(f"{name:8s} loss {figures['loss_ms']:.2f} ms   layer-1 step {figures['step_ms']:.2f} ms   "
              f"{100 * figures['fraction_of_matmul']:.1f} % of matmul")
    result = {"device": describe_device(device), "batch": args.batch, "patches_per_step": patches,
              "medians": summary, "rounds": rounds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
