"""Forward + backward time of the InfoNCE loss: this project's ``nt_xent`` (its symmetric path at
temperature 0.1, and its log-softmax path, which temperatures below 0.025 take and every
temperature took before 2026-12-02: timed at 0.02, the same work) against lightly's
``NTXentLoss`` (the same value and gradient), for several numbers of pairs; and the greedy
block-1 training step with each path (``contrastive_lw.bench.layer_step``, batch = pairs), and
with the loss on the 128-dim embeddings themselves instead of their 65 coordinates in the head's
output space (``ProjectionHead.output_basis``, since 2026-12-02), in alternating rounds (this
machine's speed drifts between minutes). Writes JSON::

    python experiments/loss_timing.py --out loss_timing.json [--pairs 256,512,1024] [--device cpu]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from statistics import median

import torch
from lightly.loss import NTXentLoss

from contrastive_lw.bench import describe_device, layer_step
from contrastive_lw.losses import SYMMETRIC_MIN_TEMPERATURE, LossConfig, nt_xent
from contrastive_lw.memory import keep_freed_memory
from contrastive_lw.model import ArchConfig, LayerwiseNet, ProjectionHead


COLD = 0.02  # below SYMMETRIC_MIN_TEMPERATURE: nt_xent's log-softmax path
assert COLD < SYMMETRIC_MIN_TEMPERATURE


def milliseconds(call, repeats: int, device: torch.device) -> float:
    """Best-of-three mean time of ``call()``."""
    best = float("inf")
    for _ in range(4):  # the first round warms up
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / repeats * 1e3)
    return best


def loss_milliseconds(loss, pairs: int, dim: int, repeats: int, device: torch.device) -> float:
    """Time of one forward + backward of ``loss`` on ``pairs`` random pairs."""
    anchor = torch.randn(pairs, dim, device=device, requires_grad=True)
    positive = torch.randn(pairs, dim, device=device, requires_grad=True)
    return milliseconds(lambda: loss(anchor, positive).backward(), repeats, device)


@contextlib.contextmanager
def full_width_loss():
    """The loss on the embeddings themselves, as every step ran before the head's output basis."""
    output_basis = ProjectionHead.output_basis
    ProjectionHead.output_basis = lambda head: None
    try:
        yield
    finally:
        ProjectionHead.output_basis = output_basis


def step_milliseconds(temperature: float, pairs: int, repeats: int, device: torch.device,
                      output_space: bool = True) -> float:
    """Time of one greedy block-1 step (the bench's 64-filter net) with InfoNCE at ``temperature``,
    the loss on the embeddings' coordinates in the head's output space or (``output_space=False``)
    on the embeddings."""
    torch.manual_seed(0)
    net = LayerwiseNet(ArchConfig(widths=(64,))).to(device, memory_format=torch.channels_last)
    with contextlib.nullcontext() if output_space else full_width_loss():
        step, _, _ = layer_step(net, 1, pairs, device, LossConfig(name="infonce", temperature=temperature))
        return milliseconds(step, repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="loss_timing.json")
    parser.add_argument("--pairs", default="256,512,1024")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians, per-round ratios)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    keep_freed_memory()  # as the command line does
    device = torch.device(args.device)
    lightly_loss = NTXentLoss(temperature=0.1)
    rows = []
    for pairs in (int(p) for p in args.pairs.split(",")):
        timings = {
            "nt_xent_ms": lambda: loss_milliseconds(nt_xent, pairs, args.dim, args.repeats, device),
            "log_softmax_path_ms": lambda: loss_milliseconds(lambda a, p: nt_xent(a, p, COLD), pairs, args.dim,
                                                             args.repeats, device),
            "lightly_ms": lambda: loss_milliseconds(lightly_loss, pairs, args.dim, args.repeats, device),
            "block1_step_ms": lambda: step_milliseconds(0.1, pairs, args.repeats, device),
            "block1_step_log_softmax_path_ms": lambda: step_milliseconds(COLD, pairs, args.repeats, device),
            "block1_step_full_width_ms": lambda: step_milliseconds(0.1, pairs, args.repeats, device, False)}
        rounds = [{name: time_it() for name, time_it in timings.items()} for _ in range(args.rounds)]
        row = {"pairs": pairs, **{name: median(r[name] for r in rounds) for name in timings}, "rounds": rounds}
        row["speedup"] = row["lightly_ms"] / row["nt_xent_ms"]
        spread = {}
        for what, ours, path in (("loss_symmetric", "nt_xent_ms", "log_softmax_path_ms"),
                                 ("block1_step_symmetric", "block1_step_ms", "block1_step_log_softmax_path_ms"),
                                 ("block1_step_output_space", "block1_step_ms", "block1_step_full_width_ms")):
            ratios = [r[path] / r[ours] for r in rounds]  # ours against the other, per round
            row[f"{what}_speedup_per_round"] = ratios
            spread[what] = f"{min(ratios):.2f}-{max(ratios):.2f}x"
        rows.append(row)
        print(f"{pairs:>5} pairs (medians of {args.rounds} rounds): nt_xent {row['nt_xent_ms']:.2f} ms (log-softmax "
              f"path {row['log_softmax_path_ms']:.2f}, {spread['loss_symmetric']} per round), lightly NTXentLoss "
              f"{row['lightly_ms']:.2f} ms ({row['speedup']:.1f}x); greedy block-1 step {row['block1_step_ms']:.2f} "
              f"ms (log-softmax path {row['block1_step_log_softmax_path_ms']:.2f}, {spread['block1_step_symmetric']}; "
              f"full-width loss {row['block1_step_full_width_ms']:.2f}, {spread['block1_step_output_space']})")
    Path(args.out).write_text(json.dumps({"device": describe_device(device), "dim": args.dim, "rows": rows}, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
