"""NCHW against channels_last on the CPU, where the network's normalised input sets the layout:
pooled block features of whole images (the linear probe's and kNN's input) and a fine-tuning step
of the transfer classifier (random crop + flip, forward, backward, Adam), interleaved, medians of
the rounds. Writes JSON::

    python experiments/layout_timing.py --out layout_timing.json [--rounds 7]

The NCHW variant is the code before ``LayerwiseNet.normalize`` returned channels_last: the plain
formula, and the classifier's weights left NCHW.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from contrastive_lw.bench import describe_device
from contrastive_lw.evaluate import block_features
from contrastive_lw.memory import keep_freed_memory
from contrastive_lw.model import ArchConfig, Classifier, LayerwiseNet
from contrastive_lw.transfer import random_crop_flip

CHANNELS_LAST_NORMALIZE = LayerwiseNet.normalize


def nchw_normalize(self: LayerwiseNet, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


def finetune_step(new_widths: tuple[int, ...], hidden: int, batch: int, layout: torch.memory_format):
    """One fine-tuning step of blocks 64, 128 + the classifier, on a fixed random uint8 batch."""
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 5, (batch,))
    model = Classifier(LayerwiseNet(ArchConfig(widths=(64, 128))), 5, new_widths, hidden).to(memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        loss = F.cross_entropy(model(random_crop_flip(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def interleaved_ms(steps: dict[str, tuple[object, object]], rounds: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of each ``(normalize, step)`` variant, alternating round by round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, (normalize, step) in steps.items():
            LayerwiseNet.normalize = normalize
            step()
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            times[name].append((time.perf_counter() - start) / repeats * 1e3)
    LayerwiseNet.normalize = CHANNELS_LAST_NORMALIZE
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="layout_timing.json")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    keep_freed_memory()  # as the command line does
    torch.manual_seed(0)
    rows = []
    net = LayerwiseNet(ArchConfig(widths=(64, 128)))
    images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8)
    def features() -> None:  # the layout comes from the normalisation alone here
        block_features(net, images, [1, 2])
    cases = [("block features, blocks 1-2, 4 096 images", 1, {"nchw": features, "channels_last": features})]
    for widths, hidden in (((512,), 512), ((64,), 128)):
        cases.append((f"fine-tuning step, new conv {widths[0]} -> fc {hidden}, batch 128", 3,
                      {"nchw": finetune_step(widths, hidden, 128, torch.contiguous_format),
                       "channels_last": finetune_step(widths, hidden, 128, torch.channels_last)}))
    for name, repeats, variants in cases:
        ms = interleaved_ms({"nchw": (nchw_normalize, variants["nchw"]),
                             "channels_last": (CHANNELS_LAST_NORMALIZE, variants["channels_last"])},
                            args.rounds, repeats)
        rows.append({"case": name, "nchw_ms": ms["nchw"], "channels_last_ms": ms["channels_last"],
                     "speedup": ms["nchw"] / ms["channels_last"]})
        print(f"{name}: NCHW {ms['nchw']:.0f} ms, channels_last {ms['channels_last']:.0f} ms "
              f"({rows[-1]['speedup']:.2f}x)")
    Path(args.out).write_text(json.dumps({"device": describe_device(torch.device("cpu")), "rows": rows}, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
