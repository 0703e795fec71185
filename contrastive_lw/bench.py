"""Benchmark: the hardware ceiling, per-layer training throughput, the data pipeline, greedy vs
end-to-end time-to-accuracy, and a SimCLR peer at equal wall-clock time."""
from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, median, variance

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .accel import native
from .augment import AugmentConfig, build_augmentation, to_float
from .data import ImageData, balanced_split, load_dataset
from .device import autocast, resolve_device
from .errors import ConfigError
from .evaluate import block_features, linear_probe_accuracy
from .losses import LossConfig, build_loss
from .accel.memory import on_huge_pages
from .backbones import BackboneConfig, build_backbone
from .blocks import BlockNet
from .config import to_dict
from .model import ArchConfig, LayerwiseNet, set_trainable
from .patches import PatchSampler
from .pretrain import (LayerwisePretrainer, PretrainConfig, Stage, adamw, augmented_views, frozen_features,
                       layer_patch, train_step)


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one benchmark run; :meth:`quick` is the CI-sized one. The race pretrains
    ``backbone`` (``lw``: the net of ``arch``) and races the depths ``race_depths`` (empty: every
    block's); ``race_only`` skips the throughput figures and the SimCLR peer, which measure ``lw``."""

    arch: ArchConfig = field(default_factory=lambda: ArchConfig(widths=(64, 128)))
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    race_depths: tuple[int, ...] = ()
    race_only: bool = False
    batch_sizes: tuple[int, ...] = (2048, 512)   # per layer for the throughput figures, last repeats
    race_batch: int = 512                         # pretraining batch of the race and the SimCLR peer
    timed_steps: int = 20
    layerwise_steps: tuple[int, ...] = (150, 300, 600, 1200)   # block 1's steps of the first greedy runs
    deeper_steps: float = 0.25   # greedy's blocks 2..k train this fraction of block 1's steps
    end2end_steps: tuple[int, ...] = (300, 600, 1200)    # steps of each end-to-end run
    resolution: float = 0.125   # time-to-accuracy: steps of the first run reaching it, to this fraction
    seeds: int = 1             # pretraining seeds per race run: its time and accuracy are their means
    paired_rounds: int = 3     # the two runs a race compares, re-timed back to back this many times
    probe_images: int = 2000

    def __post_init__(self) -> None:
        if self.probe_images < 10:
            raise ConfigError(f"probe_images must be at least 10, got {self.probe_images}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"batch sizes must be positive integers, got {list(self.batch_sizes)}")
        if self.race_batch < 2:
            raise ConfigError(f"race_batch must be at least 2 (the in-batch loss needs negatives), "
                              f"got {self.race_batch}")
        if self.seeds < 1:
            raise ConfigError(f"seeds must be a positive integer, got {self.seeds}")
        if self.paired_rounds < 0:
            raise ConfigError(f"paired_rounds must be >= 0 (0: no re-timing), got {self.paired_rounds}")
        if not 0 < self.resolution <= 1:
            raise ConfigError(f"resolution must be in (0, 1], got {self.resolution}")
        if not self.deeper_steps > 0:
            raise ConfigError(f"deeper_steps must be > 0 (1: the same steps for every block), got {self.deeper_steps}")
        blocks = self.backbone.num_blocks(self.arch)
        if any(not 1 <= k <= blocks for k in self.race_depths):
            raise ConfigError(f"race depths must be among 1..{blocks} (the backbone's blocks), "
                              f"got {list(self.race_depths)}")
        if self.backbone.name != "lw" and not self.race_only:
            raise ConfigError(f"the throughput figures and the SimCLR peer measure the lw net: add --race-only "
                              f"to race {self.backbone.name}")

    def depths(self) -> list[int]:
        """The depths the race runs: ``race_depths``, else every block's."""
        return sorted(set(self.race_depths)) or list(range(1, self.backbone.num_blocks(self.arch) + 1))

    def greedy_schedule(self, steps: int, k: int) -> tuple[int, ...]:
        """Steps per layer of a greedy run of blocks 1..``k`` whose block 1 trains ``steps``."""
        return (steps, *(max(1, round(self.deeper_steps * steps)),) * (k - 1))

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(arch=ArchConfig(widths=(16, 32)), batch_sizes=(256, 64), race_batch=64, timed_steps=3,
                   layerwise_steps=(10, 20), end2end_steps=(20, 40), probe_images=200, paired_rounds=1)


MATMUL_REPEATS = 5  # 2048^3 matmuls per round: ~0.1 s each on 2 CPU cores


def matmul_step(device: torch.device, size: int = 2048) -> tuple[Callable[[], object], float]:
    """One float32 ``size`` x ``size`` matmul, the reference ceiling, and its FLOPs."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    return (lambda: a @ b), 2.0 * size ** 3


def layer_step(net: BlockNet, k: int, batch: int, device: torch.device, loss: LossConfig | None = None,
               first: int | None = None, patch: int | None = None) -> tuple[Callable[..., None], int, float]:
    """Greedy training step of layer ``k`` alone (frozen prefix forward, block k + head forward and
    backward, AdamW) on ready-made ``patch``-sized patches (default: block k's receptive field; a
    map wider than 4 x 4 pooled to 4 x 4 before the head, as pretraining does), or of blocks
    ``first``..k together (``first=1``: the end-to-end step); the patches it takes and its FLOPs:
    the model's, counted by ``torch.utils.flop_counter`` on one step of the PyTorch paths (the
    counter does not see the C kernels; the first block's weight-gradient kernel also skips the
    zero terms of the max-pool's gradient, 3/4 of that product's FLOPs, and patches with no
    gradient at all).

    ``step(x)`` trains on the patches ``x`` (float in [0, 1], views x batch stacked); ``step()`` on
    one fixed random batch, for losses whose work does not depend on the data. A triplet loss's
    does: on a batch it has learned, most triplets are within the margin and give no gradient."""
    first = k if first is None else first
    patch = patch or net.receptive_field(k)
    set_trainable(net.blocks[: first - 1], False)
    stage = Stage(net, first, k, net.output_size(patch, k)).to(device)
    set_trainable(stage, True)
    optimizer = adamw(stage.parameters(), 1e-3, 0.0, device)
    loss_fn = build_loss(loss or LossConfig(name="triplet"))
    views = 3 if loss_fn.uses_negatives else 2
    fixed = torch.rand(views * batch, net.in_channels, patch, patch, device=device)

    def step(x: torch.Tensor = fixed) -> None:
        train_step(stage, loss_fn, optimizer, frozen_features(net, x, first - 1), views, stage.head)
    with native.pytorch_paths(), FlopCounterMode(display=False) as counter:
        step()
    return step, views * batch, float(counter.get_total_flops())


def pipeline_step(images: torch.Tensor, patch: int, batch: int, device: torch.device) -> tuple[Callable[[], object], int]:
    """The sampler + augmentation alone, as the training loop runs them (three views, as the
    triplet loss uses, cut from channels_last uint8 images on the device), and the patches it gives."""
    sampler = PatchSampler(patch, "adjacent" if 2 * patch <= min(images.shape[-2:]) else "exemplar",
                           seed=0, device=device)
    augment = build_augmentation(AugmentConfig()).to(device)
    frames = on_huge_pages(images.to(device).contiguous(memory_format=torch.channels_last))

    def views() -> torch.Tensor:
        return augmented_views(frames, sampler.sample_indices(frames.shape, batch, device), patch, augment)
    return views, 3 * batch


def measure_layer(net: LayerwiseNet, images: torch.Tensor, k: int, batch: int, steps: int,
                  device: torch.device, rounds: int = 5) -> dict:
    """Layer ``k``'s training step, the sampler + augmentation for its patches and the matmul
    ceiling, timed back to back in each of ``rounds`` rounds. The steps train on fresh patches of
    ``images``, cut by the pipeline before the round's clock starts, as the training loop sees
    them. Rates are the medians over rounds; the fraction of matmul and the pipeline ratio are the
    medians of each round's own ratio, because this machine's speed drifts more between minutes
    than between neighbouring measurements."""
    step, patches, flops = layer_step(net, k, batch, device)
    views, view_patches = pipeline_step(images, net.receptive_field(k), batch, device)
    matmul, matmul_flops = matmul_step(device)
    step(views())  # warm-up
    views()
    matmul()

    def one_round() -> tuple[float, float, float]:
        batches = iter([views() for _ in range(steps)])
        return (matmul_flops * MATMUL_REPEATS / wall_seconds(matmul, MATMUL_REPEATS, device) / 1e9,
                patches * steps / wall_seconds(lambda: step(next(batches)), steps, device),
                view_patches * steps / wall_seconds(views, steps, device))
    per_round = [one_round() for _ in range(rounds)]
    matmul_rates, step_rates, view_rates = zip(*per_round)
    gflops_per_patch = flops / patches / 1e9
    return {"k": k, "patch": net.receptive_field(k), "batch": batch, "rounds": rounds,
            "patches_per_s": median(step_rates), "gflops": median(step_rates) * gflops_per_patch,
            "matmul_gflops": median(matmul_rates),
            "fraction_of_matmul": median(s * gflops_per_patch / m for m, s, _ in per_round),
            "pipeline_patches_per_s": median(view_rates),
            "pipeline_ratio": median(v / s for _, s, v in per_round)}


def probe_accuracy(net: BlockNet, target: ImageData, target_test: ImageData, depth: int | None = None) -> float:
    """Linear-probe accuracy on the target task, features of blocks 1..``depth`` (all by default;
    4x4 pooled, concatenated)."""
    blocks = list(range(1, (depth or net.num_blocks) + 1))
    return linear_probe_accuracy(block_features(net, target.images, blocks), target.labels,
                                 block_features(net, target_test.images, blocks), target_test.labels)


RACE_LOSS = LossConfig(name="infonce")  # the race's pretraining loss, both sides


def race_config(config: BenchConfig) -> PretrainConfig:
    """The pretraining both sides of the race share: its backbone, loss, learning rate and batch
    (the greedy side without the joint pass: the race times layer-wise training against end-to-end)."""
    return PretrainConfig(arch=config.arch, backbone=config.backbone, loss=RACE_LOSS, lr=0.003,
                          batch_size=config.race_batch, joint_fraction=0.0, log_every=10 ** 9)


def race_step_gflop(config: BenchConfig, device: torch.device, image_side: int) -> tuple[list[float], float]:
    """FLOPs (in 10^9) of one step of the race at its batch, on the patches pretraining cuts from
    images of side ``image_side``: of each greedy block k (frozen prefix forward, block k and its
    head trained) and of the end-to-end step (every block trained)."""
    net = build_backbone(config.backbone, config.arch).to(device, memory_format=torch.channels_last)
    blocks = net.num_blocks

    def step_gflop(k: int, first: int | None = None) -> float:
        patch = layer_patch(net, k, race_config(config), image_side)[0]
        return layer_step(net, k, config.race_batch, device, RACE_LOSS, first, patch)[2] / 1e9
    return [step_gflop(k) for k in range(1, blocks + 1)], step_gflop(blocks, first=1)


def layerwise_vs_end2end(source: torch.Tensor, target: ImageData, target_test: ImageData,
                         config: BenchConfig, device: str, say: Callable[[str], None] = print) -> list[dict]:
    """Time-to-accuracy races, one per depth k of blocks transferred (:meth:`BenchConfig.depths`,
    in-batch softmax loss, linear probe on blocks 1..k) of the config's backbone.

    End-to-end runs of ``end2end_steps`` train the whole K-block network, as a user who wants the
    network must; their best probe accuracy at depth k is the target. Greedy runs train blocks 1..k
    only (``lw``: ``arch`` truncated to k blocks; a torchvision net: its first k blocks): block 1
    ``layerwise_steps`` shortest first, then doubling the steps, blocks 2..k ``deeper_steps`` of
    block 1's (a block on frozen features needs fewer), and stop at the first
    that reaches the target or takes as long as end-to-end's longest run (greedy gets the same
    time budget, whatever its steps cost). Each side's time is that of its first (fewest steps) run
    that reaches the target, found to the same resolution for both: between the longest run short of
    it and the first reaching it, runs of the steps halfway between are added until the two differ
    by at most ``resolution`` of the latter (greedy's steps are block 1's). If greedy never reaches
    the target, both accuracies are compared at equal time (the longest greedy run and the
    end-to-end run closest to it in time), and ``shortfall`` says by how much greedy's best run
    (``layerwise_best``) missed it. ``within_noise`` reads the same runs against the target less
    the probe's binomial standard error over the test images: the probe does not tell runs that
    close to end-to-end's best apart. Each run's time and accuracy are the means over ``seeds``
    pretraining seeds; each run keeps its seeds' accuracies (``seed_accs``), and ``seed_spread``
    pools their spread over the race's runs (None with one seed). ``work`` gives the FLOPs of the
    two runs compared (steps times each step's counted FLOPs) and their ratio: the time ratio if
    both sides ran at the same FLOP rate. Where greedy reached the target, ``paired`` re-times the two
    runs compared (seed 0, pretraining only) back to back in ``paired_rounds`` rounds
    (:func:`paired_times`): a time ratio this machine's drift between minutes hardly moves. ``say``
    reports each run as it ends."""
    base = race_config(config)
    depths = config.depths()
    greedy_step_gflop, end2end_step_gflop = race_step_gflop(config, resolve_device(device), min(source.shape[-2:]))
    end2end: dict[int, tuple[float, list[float]]] = {}
    end2end_seed_accs: dict[int, list[list[float]]] = {}  # steps -> each depth's accuracy of each seed

    def run_end2end(steps: int) -> tuple[float, list[float]]:
        if steps not in end2end:
            seconds, accs, end2end_seed_accs[steps] = over_seeds(
                dataclasses.replace(base, mode="end2end", steps_per_layer=steps), config.seeds,
                source, target, target_test, device, depths)
            end2end[steps] = seconds, accs
            say(f"end-to-end, {steps} steps: {seconds:.0f} s, probe " + ", ".join(f"{100 * a:.1f}%" for a in accs))
        return end2end[steps]

    for steps in config.end2end_steps:
        run_end2end(steps)
    budget = max(seconds for seconds, _ in end2end.values())
    targets = [max(accs[i] for _, accs in end2end.values()) for i in range(len(depths))]  # before any run is added
    races = []
    for i, (k, target_acc) in enumerate(zip(depths, targets)):
        def end2end_at_depth(steps: int, i: int = i) -> tuple[float, float]:
            seconds, accs = run_end2end(steps)
            return seconds, accs[i]

        def greedy_config(steps: int, k: int = k) -> PretrainConfig:
            return dataclasses.replace(base.first_blocks(k), steps_per_layer=config.greedy_schedule(steps, k))

        def greedy_run(steps: int, k: int = k) -> tuple[float, float]:
            run_config = greedy_config(steps)
            seconds, (acc,), (greedy_seed_accs[steps],) = over_seeds(run_config, config.seeds, source, target,
                                                                     target_test, device, [k])
            say(f"greedy, blocks 1-{k}, {' / '.join(map(str, run_config.steps_per_layer))} steps per layer: "
                f"{seconds:.0f} s, probe {100 * acc:.1f}%")
            return seconds, acc

        greedy: dict[int, tuple[float, float]] = {}
        greedy_seed_accs: dict[int, list[float]] = {}
        for steps in _greedy_steps(config.layerwise_steps):
            greedy[steps] = seconds, acc = greedy_run(steps)
            if acc >= target_acc or seconds >= budget:
                break
        _refine(greedy, target_acc, greedy_run, config.resolution)
        first_greedy = _first_reaching(greedy, target_acc)
        reached = first_greedy is not None
        runs = {steps: end2end_at_depth(steps) for steps in end2end}
        if reached:  # end-to-end's time to the target matters only then
            _refine(runs, target_acc, end2end_at_depth, config.resolution)
        greedy_runs = [{**run, "steps_per_layer": list(config.greedy_schedule(run["steps"], k)),
                        "seed_accs": greedy_seed_accs[run["steps"]]} for run in _runs(greedy)]
        end2end_runs = [{**run, "seed_accs": end2end_seed_accs[run["steps"]][i]} for run in _runs(runs)]
        best = max(greedy_runs, key=lambda run: run["acc"])  # the first of the most accurate
        greedy_steps = first_greedy if reached else max(greedy)
        layerwise_s, layerwise_acc = greedy[greedy_steps]
        end2end_steps = (_first_reaching(runs, target_acc) if reached
                         else min(runs, key=lambda steps: abs(runs[steps][0] - layerwise_s)))
        end2end_s, end2end_acc = runs[end2end_steps]
        paired = None
        if reached and config.paired_rounds:
            paired = paired_times(greedy_config(greedy_steps), dataclasses.replace(
                base, mode="end2end", steps_per_layer=end2end_steps), config.paired_rounds, source, device)
            say(f"blocks 1-{k} re-timed in {config.paired_rounds} round(s): time ratio {paired['ratio']:.2f}")
        layerwise_gflop = sum(steps * gflop for steps, gflop in
                              zip(config.greedy_schedule(greedy_steps, k), greedy_step_gflop))
        end2end_gflop = end2end_steps * end2end_step_gflop
        work = {"layerwise_gflop": layerwise_gflop, "end2end_gflop": end2end_gflop,
                "ratio": layerwise_gflop / end2end_gflop,
                "step_gflop": {"layerwise": greedy_step_gflop[:k], "end2end": end2end_step_gflop}}
        metric = f"linear probe, blocks 1-{k}" if k > 1 else "linear probe, block 1"
        races.append({"layers": k, "metric": metric, "seeds": config.seeds, "deeper_steps": config.deeper_steps,
                      "resolution": config.resolution, "target": target_acc, "reached": reached,
                      "layerwise_s": layerwise_s, "end2end_s": end2end_s, "ratio": layerwise_s / end2end_s,
                      "layerwise_acc": layerwise_acc, "end2end_acc": end2end_acc,
                      "shortfall": max(0.0, target_acc - best["acc"]), "layerwise_best": best,
                      "paired": paired, "within_noise": _within_noise(greedy, runs, target_acc, len(target_test)),
                      "work": work,
                      "seed_spread": _seed_spread([run["seed_accs"] for run in greedy_runs + end2end_runs]),
                      "layerwise_runs": greedy_runs, "end2end_runs": end2end_runs})
        races[-1]["verdict"] = race_verdict(races[-1])
    return races


def race_verdict(race: dict) -> str:
    """One word on the race: ``greedy faster`` / ``end-to-end faster`` where every reading of the
    time ratio agrees (at the target, re-timed back to back, within one probe standard error of
    it), else ``within noise``: this protocol cannot tell, more seeds or probe images may."""
    if not race["reached"]:
        return "end-to-end faster" if race["within_noise"]["ratio"] is None else "within noise"
    readings = [race["ratio"], race["within_noise"]["ratio"]]
    readings += [race["paired"]["ratio"]] if race["paired"] else []
    if any(r is None for r in readings):
        return "within noise"
    if all(r < 1 for r in readings):
        return "greedy faster"
    return "end-to-end faster" if all(r > 1 for r in readings) else "within noise"


def simclr_peer(source: torch.Tensor, target: ImageData, target_test: ImageData, arch: ArchConfig,
                budget_s: float, batch: int, device: torch.device) -> float:
    """The same backbone trained end-to-end as SimCLR (two augmented views of whole images,
    lightly's NTXentLoss) for ``budget_s`` seconds; returns its linear-probe accuracy."""
    from lightly.loss import NTXentLoss

    torch.manual_seed(0)
    net = LayerwiseNet(arch).to(device)
    net.set_normalization(source)
    head = nn.Sequential(nn.Flatten(), nn.LazyLinear(512), nn.ReLU(), nn.Linear(512, 128)).to(device)
    augment = build_augmentation(AugmentConfig(crop_scale=(0.2, 1.0), rotation_degrees=0.0)).to(device)
    loss_fn = NTXentLoss(temperature=0.1)
    images = source.to(device)
    head(F.adaptive_avg_pool2d(net(images[:2]), 1))
    optimizer = torch.optim.AdamW([*net.parameters(), *head.parameters()], lr=1e-3)
    start = time.perf_counter()
    while time.perf_counter() - start < budget_s:
        x = to_float(images[torch.randint(len(images), (batch,), device=device)])
        views = torch.cat([augment(x), augment(x)])
        with autocast(device):
            z = head(F.adaptive_avg_pool2d(net(views), 1)).float()
        value = loss_fn(*z.chunk(2))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
    return probe_accuracy(net, target, target_test)


def run_bench(source: torch.Tensor, target: ImageData, target_test: ImageData, config: BenchConfig,
              device: str = "auto", say: Callable[[str], None] = print) -> dict:
    """Every figure of the benchmark (with ``config.race_only``, the race alone), measured in this
    one call on this machine; ``say`` reports progress (minutes on a CPU)."""
    device_ = resolve_device(device)
    load_before = os.getloadavg()
    torch.manual_seed(0)
    layers = []
    if not config.race_only:
        net = LayerwiseNet(config.arch).to(device_, memory_format=torch.channels_last)
        for k in range(1, config.arch.num_blocks + 1):
            batch = config.batch_sizes[min(k, len(config.batch_sizes)) - 1]
            layers.append(measure_layer(net, source, k, batch, config.timed_steps, device_))
            row = layers[-1]
            say(f"layer {k}: {row['patches_per_s']:,.0f} patches/s ({100 * row['fraction_of_matmul']:.0f} % of "
                f"matmul), sampler + augmentation {row['pipeline_patches_per_s']:,.0f} patches/s")
    races = layerwise_vs_end2end(source, target, target_test, config, device, say)
    race = races[-1]
    result = {"device": describe_device(device_), "backbone": to_dict(config.backbone), "race_batch": config.race_batch,
              "layerwise_vs_end2end": race, "layerwise_vs_end2end_by_depth": races}
    if not config.race_only:
        simclr = simclr_peer(source, target, target_test, config.arch, race["layerwise_s"], config.race_batch, device_)
        say(f"SimCLR peer, {race['layerwise_s']:.0f} s: probe {100 * simclr:.1f}%")
        result.update({
            "matmul_gflops": median(row["matmul_gflops"] for row in layers), "layers": layers,
            "pipeline": {"patches_per_s": layers[0]["pipeline_patches_per_s"],
                         "ratio_to_model": layers[0]["pipeline_ratio"]},
            "peer_simclr": {"budget_s": race["layerwise_s"], "ours_acc": race["layerwise_acc"], "simclr_acc": simclr}})
    return {**result, "load_avg_1min": {"start": load_before[0], "end": os.getloadavg()[0]}}


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU's model, cores and threads: benches on two machines compare only
    where these match."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"{cpu_model()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} "
            f"threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}")


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name from Linux's ``cpuinfo``, else what :mod:`platform` knows (often only
    the architecture)."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(result: dict) -> str:
    """The benchmark (or the race alone) as a plain-text table."""
    load = result["load_avg_1min"]
    backbone = result.get("backbone", {"name": "lw"})  # a bench JSON written before backbones raced
    stem = ", CIFAR stem" if backbone.get("cifar_stem") else ""
    lines = [f"device: {result['device']} (load average {load['start']:.1f} at start, {load['end']:.1f} at end)",
             f"backbone: {backbone['name']}{stem}; race batch {result['race_batch']}"]
    if "layers" in result:
        lines += [f"float32 matmul: {result['matmul_gflops']:.0f} GFLOP/s", "",
                  "layer  patch  batch  patches/s   GFLOP/s  of matmul  sampler+augment  ratio"]
    for row in result.get("layers", []):
        lines.append(f"{row['k']:>5}  {row['patch']:>5}  {row['batch']:>5}  {row['patches_per_s']:>9.0f}  "
                     f"{row['gflops']:>8.1f}  {100 * row['fraction_of_matmul']:>8.0f}%  "
                     f"{row['pipeline_patches_per_s']:>15.0f}  {row['pipeline_ratio']:>4.1f}x")
    for race in result["layerwise_vs_end2end_by_depth"]:
        runs = {key: ", ".join(f"{r['steps']} steps {100 * r['acc']:.1f}% in {r['seconds']:.0f} s" for r in race[key])
                for key in ("end2end_runs", "layerwise_runs")}
        seeds = f" (each run the mean of {race['seeds']} seeds)" if race["seeds"] > 1 else ""
        deeper = f", deeper blocks {race['deeper_steps']:g} of them" if race["layers"] > 1 else ""
        lines += ["", f"{race['metric']}{seeds}:", f"  end-to-end runs (all blocks): {runs['end2end_runs']}",
                  f"  greedy runs ({race['layers']} block(s), block 1's steps{deeper}): {runs['layerwise_runs']}",
                  *([] if race["reached"] else [
                      f"  greedy's best, {100 * race['layerwise_best']['acc']:.2f}% in "
                      f"{race['layerwise_best']['seconds']:.1f} s, is {100 * race['shortfall']:.2f} point short of "
                      f"end-to-end's best {100 * race['target']:.2f}%; at equal time:"]),
                  (f"  greedy {'reached' if race['reached'] else 'did not reach'} end-to-end's best "
                   f"({100 * race['target']:.1f}%): greedy {100 * race['layerwise_acc']:.1f}% in "
                   f"{race['layerwise_s']:.1f} s, end-to-end {100 * race['end2end_acc']:.1f}% in "
                   f"{race['end2end_s']:.1f} s, time ratio {race['ratio']:.2f}"),
                  *_paired_lines(race["paired"]), _noise_line(race["within_noise"]), *_seed_lines(race["seed_spread"]),
                  f"  verdict: {race['verdict']}" + ("" if race["seeds"] > 1 else
                                                     " (one pretraining seed: --seeds 2 or more gives the spread)"),
                  (f"  work of those runs (FLOPs counted): greedy {race['work']['layerwise_gflop']:,.0f} GFLOP, "
                   f"end-to-end {race['work']['end2end_gflop']:,.0f} GFLOP, ratio {race['work']['ratio']:.2f}")]
    if "peer_simclr" in result:
        peer = result["peer_simclr"]
        lines += ["", f"SimCLR peer, same backbone, {peer['budget_s']:.1f} s: {100 * peer['simclr_acc']:.1f}% "
                      f"(ours, all blocks: {100 * peer['ours_acc']:.1f}%)"]
    return "\n".join(lines)


def _paired_lines(paired: dict | None) -> list[str]:
    if paired is None:
        return []
    rounds = ", ".join(f"{g:.1f} / {e:.1f} s" for g, e in zip(paired["layerwise_s"], paired["end2end_s"]))
    return [f"  the two re-timed back to back, greedy / end-to-end: {rounds}; time ratio {paired['ratio']:.2f} "
            f"(median of {paired['rounds']} round(s))"]


def _seed_lines(spread: dict | None) -> list[str]:
    if spread is None:
        return []
    return [f"  pretraining seeds: a run's accuracy moves by {100 * spread['std']:.2f} point between seeds (pooled "
            f"over {spread['runs']} runs), its mean of {spread['seeds']} by +-{100 * spread['standard_error']:.2f}"]


def _noise_line(noise: dict) -> str:
    reading = (f"greedy in {noise['layerwise_s']:.1f} s, end-to-end in {noise['end2end_s']:.1f} s, time ratio "
               f"{noise['ratio']:.2f}" if noise["ratio"] is not None else "greedy never reached it")
    return (f"  within the probe's standard error ({100 * noise['standard_error']:.2f} point) of that best, "
            f"{100 * noise['target']:.1f}%: {reading}")


def race_data(dataset: str, data_root: str | Path | None, source_classes: str, target_classes: str,
              probe_images: int, heldout_test: bool = False) -> tuple[torch.Tensor, ImageData, ImageData]:
    """The race's images: the source classes' training images (pretraining, no labels), the probe's
    ``probe_images`` class-balanced training images of the target classes, and its test images: half
    as many of their test images, with ``heldout_test`` also their training images it does not train on."""
    source = load_dataset(dataset, "train", data_root, source_classes).images
    target, heldout = balanced_split(load_dataset(dataset, "train", data_root, target_classes), probe_images)
    target_test = load_dataset(dataset, "test", data_root, target_classes, probe_images // 2)
    if heldout_test:
        target_test = ImageData(torch.cat([target_test.images, heldout.images]),
                                torch.cat([target_test.labels, heldout.labels]), target_test.class_names)
    return source, target, target_test


def _pretrain_and_probe(config: PretrainConfig, source: torch.Tensor, target: ImageData | None,
                        target_test: ImageData | None, device: str, depths: Sequence[int]) -> tuple[float, list[float]]:
    """Pretraining wall time, and the probe accuracy at each depth of ``depths`` (none: no probe)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        net = LayerwisePretrainer(config, Path(tmp), device, progress=False, tensorboard=False).fit(source)
        seconds = time.perf_counter() - start
    return seconds, [probe_accuracy(net, target, target_test, k) for k in depths]


def over_seeds(config: PretrainConfig, seeds: int, source: torch.Tensor, target: ImageData, target_test: ImageData,
               device: str, depths: Sequence[int]) -> tuple[float, list[float], list[list[float]]]:
    """Mean wall time and mean probe accuracy at each depth of the runs of ``config`` with seeds
    0..``seeds`` - 1, and each depth's accuracy of each seed."""
    results = [_pretrain_and_probe(dataclasses.replace(config, seed=seed), source, target, target_test, device, depths)
               for seed in range(seeds)]
    per_depth = [list(accs) for accs in zip(*(accs for _, accs in results))]
    return mean(seconds for seconds, _ in results), [mean(accs) for accs in per_depth], per_depth


def paired_times(greedy: PretrainConfig, end2end: PretrainConfig, rounds: int, source: torch.Tensor,
                 device: str) -> dict:
    """Pretraining wall time of ``greedy`` and ``end2end`` (seed 0, no probe), timed back to back in
    each of ``rounds`` rounds; ``ratio`` is the median of each round's own ratio. This machine's speed
    drifts by up to 2x between minutes, which moves the ratio of two runs timed minutes apart, as the
    race's are; it moves two neighbouring runs alike."""
    times = [[_pretrain_and_probe(dataclasses.replace(config, seed=0), source, None, None, device, ())[0]
              for config in (greedy, end2end)] for _ in range(rounds)]
    return {"rounds": rounds, "layerwise_s": [g for g, _ in times], "end2end_s": [e for _, e in times],
            "ratio": median(g / e for g, e in times)}


def _seed_spread(seed_accs: Sequence[Sequence[float]]) -> dict | None:
    """How far a run's accuracy moves with its pretraining seed: the standard deviation over seeds
    pooled over ``seed_accs`` (each run's accuracy of each seed), and the standard error of a run's
    mean over its seeds. None with one seed."""
    seeds = len(seed_accs[0])
    if seeds < 2:
        return None
    std = mean(variance(accs) for accs in seed_accs) ** 0.5
    return {"seeds": seeds, "runs": len(seed_accs), "std": std, "standard_error": std / seeds ** 0.5}


def _greedy_steps(grid: Sequence[int]) -> Iterator[int]:
    """The steps per layer of each greedy run: ``grid``, then doubling its last entry."""
    yield from grid
    steps = grid[-1]
    while True:
        steps *= 2
        yield steps


def _refine(runs: dict[int, tuple[float, float]], target: float, run: Callable[[int], tuple[float, float]],
            resolution: float) -> None:
    """Add to ``runs`` (steps -> (seconds, accuracy)) the ``run`` of the steps halfway between the
    longest run short of ``target`` and the first reaching it, until they differ by at most
    ``resolution`` of the latter's steps."""
    while (hit := _first_reaching(runs, target)) is not None:
        shorter = max((steps for steps in runs if steps < hit), default=0)
        if not shorter or hit - shorter <= max(1.0, resolution * hit):
            return
        middle = (shorter + hit) // 2
        runs[middle] = run(middle)


def _within_noise(greedy: dict[int, tuple[float, float]], end2end: dict[int, tuple[float, float]],
                  target: float, test_images: int) -> dict:
    """Each side's time to the first of its runs within one probe standard error of ``target``
    (None for greedy if none is), and their ratio."""
    error = (target * (1 - target) / test_images) ** 0.5
    within = target - error
    greedy_steps = _first_reaching(greedy, within)
    layerwise_s = None if greedy_steps is None else greedy[greedy_steps][0]
    end2end_s = end2end[_first_reaching(end2end, within)][0]
    return {"standard_error": error, "target": within, "layerwise_s": layerwise_s, "end2end_s": end2end_s,
            "ratio": None if layerwise_s is None else layerwise_s / end2end_s}


def _first_reaching(runs: dict[int, tuple[float, float]], target: float) -> int | None:
    """The fewest steps of the runs that reach ``target``, or None."""
    return min((steps for steps, (_, acc) in runs.items() if acc >= target), default=None)


def _runs(runs: dict[int, tuple[float, float]]) -> list[dict]:
    return [{"steps": steps, "seconds": runs[steps][0], "acc": runs[steps][1]} for steps in sorted(runs)]


def wall_seconds(step: Callable[[], object], steps: int, device: torch.device) -> float:
    """Wall time of ``steps`` calls of ``step``."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
