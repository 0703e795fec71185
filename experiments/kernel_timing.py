"""The package's C kernels (:mod:`contrastive_lw.native`) against their PyTorch paths, CPU only:
each kernel's own operation at the greedy layer-1 step's sizes (batch 2048: 6 144 7x7 patches),
and the layer-1 training step (``contrastive_lw.bench.layer_step``, the bench's layer-1 figure)
with every kernel, with none, and with all but one (each step on fresh random patches), each with
its fraction of the float32 matmul ceiling timed beside it (the model's FLOPs, as the bench counts
them), in alternating rounds (this machine's speed drifts between minutes). Writes JSON::

    python experiments/kernel_timing.py --out runs/kernel_timing.json [--rounds 6]
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from statistics import median

import torch

from contrastive_lw import native
from contrastive_lw.bench import describe_device, layer_step, matmul_step, wall_seconds
from contrastive_lw.losses import TripletLoss
from contrastive_lw.memory import keep_freed_memory
from contrastive_lw.model import ArchConfig, ConvBlock, LayerwiseNet

STEPS, MATMULS, OPS = 20, 5, 50
LOADERS = {"cosine_triplet": "cosine_triplet_kernel", "max_pool_relu": "max_pool_relu_kernels",
           "normalize": "normalize_kernel"}  # the kernels of the layer-1 step (the augmentation's is not in it)


def seconds(call: Callable[[], object], repeats: int) -> float:
    """Mean time of ``call()`` over ``repeats`` calls on the CPU, after one more."""
    call()
    return wall_seconds(call, repeats, torch.device("cpu")) / repeats


def kernel_operations(batch: int) -> dict[str, Callable[[], object]]:
    """Each kernel's operation alone, as the layer-1 step runs it (forward + backward where it trains)."""
    net = LayerwiseNet(ArchConfig())
    patches = torch.rand(3 * batch, 3, net.receptive_field(1), net.receptive_field(1))
    block: ConvBlock = net.blocks[0]
    features = net.normalize(patches)
    embeddings = torch.randn(3 * batch, 128, requires_grad=True)
    return {"cosine_triplet": lambda: TripletLoss()(*embeddings.chunk(3)).backward(),
            "max_pool_relu": lambda: block(features).sum().backward(),
            "normalize": lambda: net.normalize(patches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="kernel_timing.json")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2048, help="triplets per step")
    args = parser.parse_args()
    keep_freed_memory()
    if missing := [name for name, loader in LOADERS.items() if getattr(native, loader)() is None]:
        raise SystemExit(f"these C kernels cannot be built here: {missing}; nothing to compare")
    net = LayerwiseNet(ArchConfig())
    step, patches, flops = layer_step(net, 1, args.batch, torch.device("cpu"))
    side = net.receptive_field(1)
    matmul, matmul_flops = matmul_step(torch.device("cpu"))
    operations = kernel_operations(args.batch)
    settings = {"kernels": [], "pytorch": list(LOADERS.values()),  # the loaders switched off
                **{f"without {name}": [loader] for name, loader in LOADERS.items()}}
    rounds: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, off in settings.items():
            with native.pytorch_paths(off):
                figures = {}
                if name in ("kernels", "pytorch"):
                    figures = {f"{op}_ms": seconds(call, OPS) * 1e3 for op, call in operations.items()}
                ceiling = matmul_flops / seconds(matmul, MATMULS)
                # fresh patches each step: on a batch it has learned most triplets give no gradient
                batches = iter([torch.rand(patches, 3, side, side) for _ in range(STEPS + 1)])
                step_s = seconds(lambda: step(next(batches)), STEPS)
            rounds[name].append({**figures, "step_ms": step_s * 1e3, "fraction_of_matmul": flops / step_s / ceiling})
    summary = {name: {key: median(r[key] for r in runs) for key in runs[0]} for name, runs in rounds.items()}
    for name, figures in summary.items():
        ops = "   ".join(f"{key[:-3]} {value:.2f} ms" for key, value in figures.items()
                         if key not in ("step_ms", "fraction_of_matmul"))
        print(f"{name:24s} layer-1 step {figures['step_ms']:6.2f} ms   {100 * figures['fraction_of_matmul']:4.1f} % "
              f"of matmul   {ops}")
    result = {"device": describe_device(torch.device("cpu")), "batch": args.batch, "patches_per_step": patches,
              "medians": summary, "rounds": rounds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
