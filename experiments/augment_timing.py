"""Sampler + augmentation on the CPU with the C kernel (``Augmentation.cut``) against the PyTorch
path (crop -> to_float -> ``Augmentation.forward``), as the training loop runs them: three views of
a batch cut from channels_last uint8 images, fresh positions each step. Interleaved rounds,
medians. Writes JSON::

    python experiments/augment_timing.py --dataset cifar10 --data-root ../shared/data --out augment_timing.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from contrastive_lw import native
from contrastive_lw.augment import AugmentConfig, Augmentation, to_float
from contrastive_lw.bench import describe_device
from contrastive_lw.data import load_dataset
from contrastive_lw.memory import keep_freed_memory
from contrastive_lw.patches import PatchIndex, PatchSampler, crop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="sample")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default="augment_timing.json")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    keep_freed_memory()  # as the command line does
    if native.cut_and_augment_kernel() is None:
        raise SystemExit("the C kernel is unavailable here: nothing to compare")
    frames = load_dataset(args.dataset, "train", args.data_root).images.contiguous(memory_format=torch.channels_last)
    augment = Augmentation(AugmentConfig())
    rows = []
    for patch, batch, positive in ((7, 2048, "adjacent"), (13, 512, "exemplar")):
        sampler = PatchSampler(patch, positive, seed=0)

        def positions() -> PatchIndex:
            return PatchIndex(*map(torch.cat, zip(*sampler.sample_indices(frames.shape, batch))))
        variants = {"pytorch": lambda: augment(to_float(crop(frames, positions(), patch))),
                    "kernel": lambda: augment.cut(frames, positions(), patch)}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, step in variants.items():
                step()
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[name].append((time.perf_counter() - start) / args.steps)
        seconds = {name: statistics.median(values) for name, values in times.items()}
        rows.append({"patch": patch, "patches": 3 * batch,
                     **{f"{name}_patches_per_s": 3 * batch / s for name, s in seconds.items()},
                     "speedup": seconds["pytorch"] / seconds["kernel"]})
        print(f"{patch}x{patch}, {3 * batch} patches a step: PyTorch {rows[-1]['pytorch_patches_per_s']:,.0f}, "
              f"kernel {rows[-1]['kernel_patches_per_s']:,.0f} patches/s ({rows[-1]['speedup']:.2f}x)")
    Path(args.out).write_text(json.dumps({"device": describe_device(torch.device("cpu")), "dataset": args.dataset,
                                          "rows": rows}, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
