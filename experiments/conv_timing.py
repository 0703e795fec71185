"""Training-step time of a block's convolution at greedy pretraining's shapes (2 x 2 outputs):
oneDNN's convolution against :class:`contrastive_lw.model.Conv2d`'s one-matmul (im2col) path,
and the whole greedy layer-1 and layer-2 training steps both ways. Writes JSON::

    python experiments/conv_timing.py --out conv_timing.json [--rounds 12]

The two variants alternate round by round and the median is kept: this machine's speed drifts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from contrastive_lw.bench import describe_device
from contrastive_lw.losses import LossConfig, build_loss
from contrastive_lw.memory import keep_freed_memory
from contrastive_lw.model import Conv2d, LayerwiseNet, ProjectionHead, set_trainable
from contrastive_lw.pretrain import frozen_features, train_step

# (name, in channels, out channels, kernel, input side, batch): the blocks at their receptive
# fields (block 2 on block 1's 4x4 output of 13x13 patches, block 3 on 4x4 of 25x25), and one
# larger output that Conv2d leaves to oneDNN.
SHAPES = [("block 1, 7x7 patch", 3, 64, 6, 7, 6144), ("block 2, 4x4 input", 64, 128, 3, 4, 1536),
          ("block 3, 4x4 input", 128, 256, 3, 4, 1536), ("block 2, 8x8 input", 64, 128, 3, 8, 512)]


def median_ms(module: nn.Module, step, rounds: int, repeats: int = 5) -> dict[str, float]:
    """Median over ``rounds`` of the mean time of ``repeats`` calls of ``step``, with the
    convolutions of ``module`` run by oneDNN and as one matmul, interleaved."""
    convs = [m for m in module.modules() if isinstance(m, Conv2d)]
    times: dict[str, list[float]] = {"onednn": [], "matmul": []}
    for _ in range(rounds):
        for name, times_of in times.items():
            for conv in convs:
                conv.matmul_path = name == "matmul"
            step()
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            times_of.append((time.perf_counter() - start) / repeats * 1e3)
    for conv in convs:
        conv.matmul_path = True
    return {name: statistics.median(values) for name, values in times.items()}


def conv_rows(rounds: int) -> list[dict]:
    rows = []
    for name, in_ch, out_ch, kernel, side, batch in SHAPES:
        conv = Conv2d(in_ch, out_ch, kernel).to(memory_format=torch.channels_last)
        x = torch.rand(batch, in_ch, side, side).contiguous(memory_format=torch.channels_last)
        grad = torch.ones_like(conv(x))

        def step() -> None:
            conv(x).backward(grad)
        ms = median_ms(conv, step, rounds)
        rows.append({"shape": name, "batch": batch, "matmul_used": conv._as_matmul(x), "onednn_ms": ms["onednn"],
                     "matmul_ms": ms["matmul"], "speedup": ms["onednn"] / ms["matmul"]})
        print(f"{name:>20} x{batch}: oneDNN {ms['onednn']:.1f} ms, one matmul {ms['matmul']:.1f} ms "
              f"({rows[-1]['speedup']:.2f}x{'' if rows[-1]['matmul_used'] else ', not used at this shape'})")
    return rows


def greedy_step(k: int, batch: int, rounds: int) -> dict:
    """The whole greedy step of layer ``k`` as the bench times it (frozen prefix forward, block k +
    head forward and backward, triplet loss, AdamW)."""
    net = LayerwiseNet().to(memory_format=torch.channels_last)
    set_trainable(net.blocks[: k - 1], False)
    stage = nn.Sequential(net.blocks[k - 1], ProjectionHead(net.out_channels(k)))
    set_trainable(stage, True)
    optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-3)
    patch = net.receptive_field(k)
    loss_fn, x = build_loss(LossConfig(name="triplet")), torch.rand(3 * batch, 3, patch, patch)

    def step() -> None:
        train_step(stage, loss_fn, optimizer, frozen_features(net, x, k - 1), 3)
    ms = median_ms(stage, step, rounds)
    row = {"k": k, "batch": batch, "onednn_patches_per_s": 3 * batch / ms["onednn"] * 1e3,
           "matmul_patches_per_s": 3 * batch / ms["matmul"] * 1e3, "speedup": ms["onednn"] / ms["matmul"]}
    print(f"layer-{k} training step, batch {batch}: {row['onednn_patches_per_s']:,.0f} -> "
          f"{row['matmul_patches_per_s']:,.0f} patches/s ({row['speedup']:.2f}x)")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="conv_timing.json")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batch-sizes", default="2048,512", help="of the layer-1 and layer-2 steps")
    args = parser.parse_args()
    keep_freed_memory()  # as the command line does
    torch.manual_seed(0)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    result = {"device": describe_device(torch.device("cpu")), "convolutions": conv_rows(args.rounds),
              "greedy_steps": [greedy_step(k, batch, args.rounds) for k, batch in enumerate(batches, start=1)]}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
