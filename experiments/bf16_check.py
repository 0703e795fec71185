"""One pretraining run in float32, under CPU bf16 autocast, or with only the InfoNCE loss under
it, with the bench race's settings (blocks 64, 128; InfoNCE; batch 512), then the linear probe on
blocks 1-2 and on block 1 (``--blocks 1``: block 1 alone, as the race's depth-1 greedy runs)::

    python experiments/bf16_check.py {fp32,bf16,bf16-loss} {greedy,end2end} STEPS --data-root ../shared/data

CPU runs are float32 (``device.autocast``); this script is the check of what bf16 would do on a
CPU with AVX512-BF16 or AMX. The bf16 arm runs the training step and the frozen blocks under
``torch.autocast("cpu", bfloat16)`` and the convolutions through oneDNN (the one-matmul path is
float32-only). The bf16-loss arm runs only ``losses.nt_xent`` under autocast: its three
similarity matmuls in bf16 (float32 accumulation), the rest in float32. One seed: the probe's
noise is about ±0.6 points.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from contrastive_lw import losses, pretrain
from contrastive_lw.bench import BenchConfig, probe_accuracy
from contrastive_lw.data import load_dataset
from contrastive_lw.losses import LossConfig
from contrastive_lw.memory import keep_freed_memory
from contrastive_lw.model import Conv2d


def use_cpu_bf16() -> None:
    """Patch the pretraining loop to run under CPU bf16 autocast."""
    def bf16(device: torch.device):
        return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
    frozen = pretrain.frozen_features

    def frozen_bf16(net, x, prefix):
        with bf16(x.device):
            return frozen(net, x, prefix)
    pretrain.autocast, pretrain.frozen_features, Conv2d.matmul_path = bf16, frozen_bf16, False


def use_cpu_bf16_loss() -> None:
    """Patch the InfoNCE loss to run its similarity matmuls in bf16 (CPU autocast)."""
    nt_xent = losses.nt_xent

    def nt_xent_bf16(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            return nt_xent(*args, **kwargs)
    losses.nt_xent = nt_xent_bf16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("precision", choices=("fp32", "bf16", "bf16-loss"))
    parser.add_argument("mode", choices=pretrain.MODES)
    parser.add_argument("steps", type=int, help="per layer (greedy) or in all (end2end)")
    parser.add_argument("--blocks", type=int, default=2, help="blocks to pretrain (1 or 2)")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    keep_freed_memory()  # as the command line does
    if args.precision == "bf16":
        use_cpu_bf16()
    elif args.precision == "bf16-loss":
        use_cpu_bf16_loss()
    source = load_dataset("cifar10", "train", args.data_root, "0-4").images
    target = load_dataset("cifar10", "train", args.data_root, "5-9", 10000)
    target_test = load_dataset("cifar10", "test", args.data_root, "5-9", 5000)
    config = pretrain.PretrainConfig(arch=BenchConfig().arch.truncated(args.blocks), loss=LossConfig(name="infonce"), lr=0.003,
                                     batch_size=512, log_every=10 ** 9, steps_per_layer=args.steps, mode=args.mode)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        net = pretrain.LayerwisePretrainer(config, tmp, "cpu", progress=False, tensorboard=False).fit(source)
        seconds = time.perf_counter() - start
    depths = range(args.blocks, 0, -1)
    print(f"{args.precision} {args.mode} {args.blocks} block(s), {args.steps} steps: {seconds:.1f} s, probe " +
          ", ".join(f"on blocks 1-{k} {100 * probe_accuracy(net, target, target_test, k):.2f} %" for k in depths))


if __name__ == "__main__":
    main()
