"""Forward + backward time of the InfoNCE loss: this project's ``nt_xent`` against lightly's
``NTXentLoss`` (the same value and gradient), for several numbers of pairs. Writes JSON::

    python experiments/loss_timing.py --out loss_timing.json [--pairs 256,512,1024] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from lightly.loss import NTXentLoss

from contrastive_lw.bench import describe_device
from contrastive_lw.losses import nt_xent
from contrastive_lw.memory import keep_freed_memory


def milliseconds(loss, pairs: int, dim: int, repeats: int, device: torch.device) -> float:
    """Best-of-three mean time of one forward + backward of ``loss`` on ``pairs`` random pairs."""
    anchor = torch.randn(pairs, dim, device=device, requires_grad=True)
    positive = torch.randn(pairs, dim, device=device, requires_grad=True)
    best = float("inf")
    for _ in range(4):  # the first round warms up
        start = time.perf_counter()
        for _ in range(repeats):
            loss(anchor, positive).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / repeats * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="loss_timing.json")
    parser.add_argument("--pairs", default="256,512,1024")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    keep_freed_memory()  # as the command line does
    device = torch.device(args.device)
    lightly_loss = NTXentLoss(temperature=0.1)
    rows = []
    for pairs in (int(p) for p in args.pairs.split(",")):
        ours = milliseconds(nt_xent, pairs, args.dim, args.repeats, device)
        theirs = milliseconds(lightly_loss, pairs, args.dim, args.repeats, device)
        rows.append({"pairs": pairs, "nt_xent_ms": ours, "lightly_ms": theirs, "speedup": theirs / ours})
        print(f"{pairs:>5} pairs: nt_xent {ours:.2f} ms, lightly NTXentLoss {theirs:.2f} ms ({theirs / ours:.1f}x)")
    Path(args.out).write_text(json.dumps({"device": describe_device(device), "dim": args.dim, "rows": rows}, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
