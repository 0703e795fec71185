"""Ablation harness for layer-wise pretraining: pretrain on the source classes, read out on the
target classes with the project's linear probe, one JSON row per run.

One run (``--init layerwise``, the default) builds ``PretrainConfig()`` (the plain ``pretrain``
command's defaults) with ``--set`` overrides, pretrains ``--layers`` blocks greedily on the train
images of the source classes (CIFAR-10 0-4: 25 000 images), then reads the blocks out on the target
classes (5-9): a softmax regression (:func:`contrastive_lw.evaluate.linear_probe_accuracy`, L-BFGS
on standardised features, 200 iterations, L2 weight ``--probe-wd`` 1e-2, or the best of comma-separated
candidates on a held-out fifth of the probe's training images) trained on a fixed random subset of ``--probe-train``
10 000 of the 25 000 target train images (the same subset in every run; 0 takes all: the probe of
3 blocks on all of them took 7 min on the shared 2 cores) and tested on all 5 000 target test images, on the features (:func:`contrastive_lw.evaluate.block_features`, average-pooled to
``--pool`` x ``--pool``) of each block k alone (``block_k``) and of blocks 1..k concatenated
(``blocks_1..k``, the all-block read-out). ``--init random`` reads out the same architecture
untrained (normalised on the target images, as ``compare``'s random init); ``--init RUN_DIR`` reads
out a run kept with ``--keep`` again (read-out ablations: ``--pool``, ``--probe-wd``); ``--init supervised``
trains it with labels on the source classes as ``contrastive-lw supervised --epochs
--supervised-epochs`` does (the baseline's wall time is its training time), from the same initial
network as layer-wise pretraining (:func:`contrastive_lw.model.initial_network`: seed, ``init_scale``). The row, appended to
``OUT/results.jsonl``: name, init, seed, the full pretrain config and the overrides, accuracies,
pretraining (or supervised training) wall time, per-layer seconds (the joint pass's last, if any),
probe seconds, MACs per 32x32 image of the network.

Command lines::

    export PYTHONPATH=. OMP_NUM_THREADS=2
    python experiments/ablate.py --name infonce --layers 1 --set loss.name=infonce
    python experiments/ablate.py --name random --init random --layers 3 --seed 1
    python experiments/ablate.py --name supervised5 --init supervised --layers 3 --supervised-epochs 5
    python experiments/ablate.py --name w256 --layers 1 --set arch.widths=[256]
    python experiments/ablate.py --table                     # markdown table of OUT/results.jsonl
    python experiments/ablate.py --table --names a,b --by-seed  # chosen rows, seeds averaged or not
    python experiments/ablate.py --filters FIG.png runs/ablate/runs/a-seed0 runs/ablate/runs/b-seed0

``--set KEY=VALUE`` takes a dotted key of the pretrain config (``loss.temperature=0.2``,
``positives=[exemplar]``, ``augment.jitter=0.8``, ``steps_per_layer=[2000,1000]``); the value is
read as YAML. ``arch.widths`` is cut to ``--layers`` blocks after the overrides.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml

from contrastive_lw.checkpoint import BACKBONE, layer_checkpoints, load_checkpoint
from contrastive_lw.config import to_dict
from contrastive_lw.data import load_dataset
from contrastive_lw.evaluate import block_features, linear_probe_accuracy, select_weight_decay
from contrastive_lw.model import LayerwiseNet, initial_network
from contrastive_lw.pretrain import LayerwisePretrainer, PretrainConfig
from contrastive_lw.supervised import train_supervised
from contrastive_lw.transfer import TransferConfig, load_init

DEFAULT_OUT = "runs/ablate"


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """``values`` (a nested dict) with each ``a.b=yaml`` override set in place."""
    for item in overrides:
        key, _, text = item.partition("=")
        if not _:
            raise SystemExit(f"--set needs KEY=VALUE, got {item!r}")
        *path, last = key.split(".")
        node = values
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(text)
    return values


def weight_decays(text: str) -> tuple[float, ...]:
    """``--probe-wd``: one weight decay or comma-separated candidates, each >= 0."""
    values = tuple(float(v) for v in text.split(","))
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"weight decays must be >= 0, got {text}")
    return values


def pretrain_config(overrides: list[str], layers: int, seed: int) -> PretrainConfig:
    """The plain command's defaults + overrides, ``layers`` blocks, ``seed``."""
    values = apply_overrides(to_dict(PretrainConfig()), overrides)
    values["arch"]["widths"] = list(values["arch"]["widths"])[:layers]
    if len(values["arch"]["widths"]) < layers:
        raise SystemExit(f"arch.widths has fewer than {layers} entries")
    values["seed"] = seed
    return PretrainConfig.from_dict(values)


def macs_per_image(net: LayerwiseNet, side: int = 32) -> int:
    """Multiply-accumulates of the network's convolutions on one ``side`` x ``side`` image."""
    total = 0
    for block in net.blocks:
        conv = block.conv
        out = side + 2 * conv.padding[0] - conv.kernel_size[0] + 1
        total += out * out * conv.in_channels * conv.out_channels * conv.kernel_size[0] ** 2
        side = out // block.pool if block.pool > 1 else out
    return total


def read_out(net: LayerwiseNet, target, target_test, pool: int,
             weight_decays: tuple[float, ...] = (1e-4,)) -> tuple[dict[str, float], dict[str, float]]:
    """Linear-probe accuracy (%) of each block alone and of blocks 1..k concatenated (the features
    of every block computed in one pass, then split into blocks), and the probe's weight decay for each:
    with more than one of ``weight_decays``, the one :func:`select_weight_decay` picks on a held-out fifth
    of the probe's training images, before the probe is refitted on all of them."""
    blocks = list(range(1, net.num_blocks + 1))
    sizes = [net.out_channels(k) * min(pool, net.output_size(target.images.shape[-1], k)) ** 2 for k in blocks]
    train_parts = block_features(net, target.images, blocks, pool).split(sizes, dim=1)
    test_parts = block_features(net, target_test.images, blocks, pool).split(sizes, dim=1)
    feature_sets = {}
    for k in blocks:
        feature_sets[f"block_{k}"] = [k]
        if k > 1:
            feature_sets[f"blocks_1..{k}"] = list(range(1, k + 1))
    accs, chosen = {}, {}
    for name in feature_sets:
        train_x = torch.cat([train_parts[k - 1] for k in feature_sets[name]], 1)
        test_x = torch.cat([test_parts[k - 1] for k in feature_sets[name]], 1)
        chosen[name] = (weight_decays[0] if len(weight_decays) == 1
                        else select_weight_decay(train_x, target.labels, weight_decays))
        accs[name] = 100 * linear_probe_accuracy(train_x, target.labels, test_x, target_test.labels, chosen[name])
    return accs, chosen


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    source = load_dataset(args.dataset, "train", args.data_root, args.source)
    target = load_dataset(args.dataset, "train", args.data_root, args.target)
    target_test = load_dataset(args.dataset, "test", args.data_root, args.target)
    if args.probe_train:
        keep = torch.randperm(len(target.images), generator=torch.Generator().manual_seed(0))[: args.probe_train]
        target = dataclasses.replace(target, images=target.images[keep], labels=target.labels[keep])
    config = pretrain_config(args.set, args.layers, args.seed)
    run_dir = Path(args.out) / "runs" / f"{args.name}-seed{args.seed}"
    per_layer: list[float] = []
    start = time.perf_counter()
    if args.init == "layerwise":
        with tempfile.TemporaryDirectory() as tmp:
            trainer = LayerwisePretrainer(config, run_dir if args.keep else tmp, "cpu", progress=False,
                                          tensorboard=False)
            if args.keep and run_dir.exists() and not args.resume:
                raise SystemExit(f"{run_dir} exists: pick another --name, remove it or --resume it")
            net = trainer.fit(source.images)
            metrics = [load_checkpoint(p, BACKBONE)["metrics"] for p in layer_checkpoints(trainer.out_dir).values()]
            per_layer = [m["seconds"] for m in metrics] + [m["joint_seconds"] for m in metrics[-1:]
                                                           if "joint_seconds" in m]
    elif args.init == "supervised":
        source_test = load_dataset(args.dataset, "test", args.data_root, args.source)
        sup = TransferConfig(epochs=args.supervised_epochs, new_widths=(), hidden=0, seed=args.seed)
        with tempfile.TemporaryDirectory() as tmp:
            kept = run_dir if args.keep else tmp
            result = train_supervised(source, source_test, config.arch, sup, kept, "cpu", tensorboard=False,
                                      init_scale=config.init_scale)
            net = load_init(kept, target.images)[1]
        per_layer = [result.seconds]
    elif args.init == "random":
        torch.manual_seed(args.seed)
        net = load_init("random", target.images, config.arch)[1]
    else:  # a kept run: read out again (another pool or probe weight decay), nothing trained
        net = load_init(args.init, target.images)[1]
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    accs, chosen_wd = read_out(net, target, target_test, args.pool, args.probe_wd)
    row = {"name": args.name, "init": args.init, "seed": args.seed, "layers": args.layers, "overrides": args.set,
           "supervised_epochs": args.supervised_epochs if args.init == "supervised" else None,
           "pool": args.pool, "probe_wd": chosen_wd if len(args.probe_wd) > 1 else args.probe_wd[0],
           "probe_wd_candidates": list(args.probe_wd), "probe_train": len(target.images), "probe_test": len(target_test.images),
           "accs": accs, "train_seconds": round(sum(per_layer) if args.resume else train_seconds, 1), "layer_seconds": [round(s, 1) for s in per_layer],
           "probe_seconds": round(time.perf_counter() - start, 1), "macs": macs_per_image(net),
           "config": to_dict(config), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def load_rows(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def markdown_table(rows: list[dict], names: list[str] | None = None, by_seed: bool = False) -> str:
    """Rows grouped by name (and seed with ``by_seed``), in first-seen order (or ``names``' order):
    mean ± std over seeds of every read-out, pretraining seconds (mean over the rows that trained:
    a kept run read out again has none; random rows count their draw), MMACs per image."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if names is None or r["name"] in names:
            groups[(r["name"], r["seed"]) if by_seed else (r["name"],)].append(r)
    order = sorted(groups, key=lambda g: names.index(g[0])) if names else list(groups)
    columns = sorted({c for g in groups.values() for r in g for c in r["accs"]},
                     key=lambda c: (int(c.split("_")[-1][-1]), c.startswith("blocks")))
    lines = ["| run | init | seeds | " + " | ".join(c.replace("_", " ") for c in columns)
             + " | train s | MMAC/img |", "|---" * (len(columns) + 5) + "|"]
    for key in order:
        g = groups[key]
        cells = []
        for c in columns:
            values = [r["accs"][c] for r in g if c in r["accs"]]
            if not values:
                cells.append("–")
            elif len(values) == 1:
                cells.append(f"{values[0]:.1f}")
            else:
                cells.append(f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}")
        seeds = ",".join(str(r["seed"]) for r in g)
        trained = [r["train_seconds"] for r in g if r["train_seconds"] > 0]  # a kept run read out again: 0
        seconds = f"{statistics.mean(trained):.0f}" if trained else "–"
        init = ", ".join(dict.fromkeys(Path(r["init"]).name if "/" in r["init"] else r["init"]  # a kept run: its dir
                                       for r in g))
        lines.append(f"| {key[0]} | {init} | {seeds} | " + " | ".join(cells)
                     + f" | {seconds} | {g[0]['macs'] / 1e6:.1f} |")
    return "\n".join(lines)


def filter_figure(path: str | Path, run_dirs: list[str], seed: int, init_scale: float) -> Path:
    """Block-1 filters of kept runs beside the initialisation they all started from (the ``seed``'s
    draw scaled by ``init_scale``), captioned so."""
    from contrastive_lw.checkpoint import load_backbone
    from contrastive_lw.visualize import save_filter_grids

    nets = {Path(d).name: load_backbone(d) for d in run_dirs}
    arch = next(iter(nets.values())).arch
    start = initial_network(arch, torch.zeros(2, arch.in_channels, 2, 2, dtype=torch.uint8), seed, init_scale)
    weights = {f"initialisation (seed {seed})": start.blocks[0].conv.weight,
               **{f"{name} block 1": net.blocks[0].conv.weight for name, net in nets.items()}}
    return save_filter_grids(weights, path, f"Every trained network shown started from the initialisation on the "
                                            f"left (model.initial_network: seed {seed}, conv weights x init_scale "
                                            f"{init_scale}); each filter is scaled to its own range.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", help="row name (one config; seeds share it)")
    parser.add_argument("--init", default="layerwise",
                        help="layerwise, random, supervised, or a kept run directory to read out again")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--supervised-epochs", type=int, default=5)
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--probe-wd", type=weight_decays, default=(1e-2,),
                        help="the probe's L2 weight, or comma-separated candidates, one chosen per feature set on a "
                             "held-out fifth of the probe's training images (1e-2: the best all-block read-out of "
                             "1e-4..1e-1 on the test images for layer-wise and random blocks alike, docs/STUDY.md)")
    parser.add_argument("--probe-train", type=int, default=10000,
                        help="target train images for the probe, a fixed class-mixed subset (0: all 25 000)")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--source", default="0-4")
    parser.add_argument("--target", default="5-9")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the pretraining run under OUT/runs/")
    parser.add_argument("--resume", action="store_true",
                        help="with --keep: continue a kept run after its last finished layer (the pretraining "
                             "time is then the sum of the layers' own seconds)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--table", action="store_true", help="print the markdown table of OUT/results.jsonl")
    parser.add_argument("--names", help="comma-separated rows for --table, in this order")
    parser.add_argument("--by-seed", action="store_true")
    parser.add_argument("--filters", nargs="+", metavar="PNG RUN_DIR",
                        help="draw the block-1 filters of kept runs (trained from --seed) beside their initialisation")
    args = parser.parse_args(argv)
    if args.filters:
        print(filter_figure(args.filters[0], args.filters[1:], args.seed,
                            pretrain_config(args.set, 1, args.seed).init_scale))
        return 0
    if args.table:
        print(markdown_table(load_rows(Path(args.out) / "results.jsonl"),
                             args.names.split(",") if args.names else None, args.by_seed))
        return 0
    if not args.name:
        parser.error("--name is required for a run")
    row = run(args)
    print(json.dumps({k: row[k] for k in ("name", "init", "seed", "accs", "train_seconds", "layer_seconds",
                                          "probe_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
