"""Benchmark: the hardware ceiling, per-layer training throughput, the data pipeline, greedy vs
end-to-end time-to-accuracy, and a SimCLR peer at equal wall-clock time."""
from __future__ import annotations

import dataclasses
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .augment import AugmentConfig, build_augmentation, to_float
from .data import ImageData
from .device import autocast, resolve_device
from .evaluate import block_features, linear_probe_accuracy
from .losses import LossConfig, build_loss
from .model import ArchConfig, LayerwiseNet, ProjectionHead, set_trainable
from .patches import PatchSampler
from .pretrain import LayerwisePretrainer, PretrainConfig


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one benchmark run; :meth:`quick` is the CI-sized one."""

    arch: ArchConfig = ArchConfig(widths=(64, 128))
    batch_sizes: tuple[int, ...] = (2048, 512)   # per layer, last repeats
    timed_steps: int = 20
    layerwise_steps: int = 600                    # per layer, for the time-to-accuracy race
    end2end_budgets: tuple[float, ...] = (0.5, 1.0, 2.0)   # end-to-end steps, as multiples of layerwise_steps
    probe_images: int = 2000

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(arch=ArchConfig(widths=(16, 32)), batch_sizes=(256, 64), timed_steps=3, layerwise_steps=20,
                   end2end_budgets=(1.0, 2.0), probe_images=200)


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """float32 matmul throughput: the reference ceiling."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    for _ in range(2):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9


def layer_throughput(net: LayerwiseNet, k: int, batch: int, steps: int, device: torch.device,
                     loss: LossConfig = LossConfig()) -> dict:
    """Greedy training step of layer ``k`` alone (frozen prefix forward, block k + head forward and
    backward, AdamW) on ready-made patches: patches/s and achieved GFLOP/s (FLOPs counted by
    ``torch.utils.flop_counter`` on one step)."""
    patch = net.receptive_field(k)
    set_trainable(net.blocks[: k - 1], False)
    block, head = net.blocks[k - 1], ProjectionHead(net.out_channels(k) * net.output_size(patch, k) ** 2).to(device)
    set_trainable(block, True)
    optimizer = torch.optim.AdamW([*block.parameters(), *head.parameters()], lr=1e-3)
    loss_fn = build_loss(loss)
    views = 3 if loss_fn.uses_negatives else 2
    x = torch.rand(views * batch, net.arch.in_channels, patch, patch, device=device).contiguous(
        memory_format=torch.channels_last)

    def step() -> None:
        with torch.no_grad():
            features = net(x, k - 1) if k > 1 else net.normalize(x)
        with autocast(device):
            embeddings = head(block(features)).float().chunk(views)
            value = loss_fn(*embeddings)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
    with FlopCounterMode(display=False) as counter:
        step()
    seconds = _timed(step, steps, device)
    patches_per_s = steps * views * batch / seconds
    return {"k": k, "patch": patch, "batch": batch, "patches_per_s": patches_per_s,
            "gflops": counter.get_total_flops() / (views * batch) * patches_per_s / 1e9}


def pipeline_throughput(images: torch.Tensor, patch: int, batch: int, steps: int, device: torch.device) -> float:
    """Patches/s of the sampler + augmentation alone (three views, as the triplet loss uses)."""
    sampler = PatchSampler(patch, "adjacent", seed=0, device=device)
    augment = build_augmentation(AugmentConfig(), patch).to(device)
    seconds = _timed(lambda: augment(to_float(torch.cat(sampler(images, batch)))), steps, device)
    return steps * 3 * batch / seconds


def probe_accuracy(net: LayerwiseNet, target: ImageData, target_test: ImageData) -> float:
    """Linear-probe accuracy on the target task, features of every block (4x4 pooled)."""
    blocks = list(range(1, net.num_blocks + 1))
    return linear_probe_accuracy(block_features(net, target.images, blocks), target.labels,
                                 block_features(net, target_test.images, blocks), target_test.labels)


def layerwise_vs_end2end(source: torch.Tensor, target: ImageData, target_test: ImageData,
                         config: BenchConfig, device: str) -> tuple[dict, float, float]:
    """Wall time for greedy training to reach its accuracy, and for end-to-end training to reach
    the same (or both accuracies at equal time if it never does). Returns (figures, greedy time,
    greedy accuracy)."""
    base = PretrainConfig(arch=config.arch, loss=LossConfig(name="infonce"), lr=0.003,
                          batch_size=config.batch_sizes[-1], log_every=10 ** 9)
    greedy_s, greedy_acc = _pretrain_and_probe(dataclasses.replace(base, steps_per_layer=config.layerwise_steps),
                                               source, target, target_test, device)
    tries = []
    for multiple in config.end2end_budgets:
        steps = max(1, int(multiple * config.layerwise_steps))
        seconds, acc = _pretrain_and_probe(dataclasses.replace(base, mode="end2end", steps_per_layer=steps),
                                           source, target, target_test, device)
        tries.append((seconds, acc))
        if acc >= greedy_acc:
            break
    reached = [t for t in tries if t[1] >= greedy_acc]
    end2end_s, end2end_acc = reached[0] if reached else min(tries, key=lambda t: abs(t[0] - greedy_s))
    return ({"metric": "linear probe, all blocks", "target": greedy_acc, "layerwise_s": greedy_s,
             "end2end_s": end2end_s, "ratio": greedy_s / end2end_s, "layerwise_acc": greedy_acc,
             "end2end_acc": end2end_acc, "end2end_reached_target": bool(reached),
             "end2end_tries": [{"seconds": s, "acc": a} for s, a in tries]}, greedy_s, greedy_acc)


def simclr_peer(source: torch.Tensor, target: ImageData, target_test: ImageData, arch: ArchConfig,
                budget_s: float, batch: int, device: torch.device) -> float:
    """The same backbone trained end-to-end as SimCLR (two augmented views of whole images,
    lightly's NTXentLoss) for ``budget_s`` seconds; returns its linear-probe accuracy."""
    from lightly.loss import NTXentLoss

    torch.manual_seed(0)
    net = LayerwiseNet(arch).to(device)
    net.set_normalization(source)
    head = nn.Sequential(nn.Flatten(), nn.LazyLinear(512), nn.ReLU(), nn.Linear(512, 128)).to(device)
    size = source.shape[-1]
    augment = build_augmentation(AugmentConfig(crop_scale=(0.2, 1.0), rotation_degrees=0.0), size).to(device)
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
              device: str = "auto") -> dict:
    """Every figure of the benchmark, measured in this one call on this machine."""
    device_ = resolve_device(device)
    torch.manual_seed(0)
    gflops = matmul_gflops(device_)
    net = LayerwiseNet(config.arch).to(device_, memory_format=torch.channels_last)
    layers = []
    for k in range(1, config.arch.num_blocks + 1):
        batch = config.batch_sizes[min(k, len(config.batch_sizes)) - 1]
        row = layer_throughput(net, k, batch, config.timed_steps, device_)
        layers.append({**row, "fraction_of_matmul": row["gflops"] / gflops})
    pipeline = pipeline_throughput(source.to(device_), layers[0]["patch"], layers[0]["batch"], config.timed_steps, device_)
    race, greedy_s, greedy_acc = layerwise_vs_end2end(source, target, target_test, config, device)
    simclr = simclr_peer(source, target, target_test, config.arch, greedy_s, config.batch_sizes[-1], device_)
    return {
        "device": describe_device(device_), "matmul_gflops": gflops, "layers": layers,
        "pipeline": {"patches_per_s": pipeline, "ratio_to_model": pipeline / layers[0]["patches_per_s"]},
        "layerwise_vs_end2end": race,
        "peer_simclr": {"budget_s": greedy_s, "ours_acc": greedy_acc, "simclr_acc": simclr},
    }


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def format_table(result: dict) -> str:
    """The benchmark as a plain-text table."""
    lines = [f"device: {result['device']}", f"float32 matmul: {result['matmul_gflops']:.0f} GFLOP/s", "",
             "layer  patch  batch  patches/s   GFLOP/s  of matmul"]
    for row in result["layers"]:
        lines.append(f"{row['k']:>5}  {row['patch']:>5}  {row['batch']:>5}  {row['patches_per_s']:>9.0f}  "
                     f"{row['gflops']:>8.1f}  {100 * row['fraction_of_matmul']:>8.0f}%")
    pipe, race, peer = result["pipeline"], result["layerwise_vs_end2end"], result["peer_simclr"]
    lines += ["", f"sampler + augmentation: {pipe['patches_per_s']:.0f} patches/s = "
                  f"{pipe['ratio_to_model']:.2f}x what layer 1 consumes",
              f"greedy layer-wise: {100 * race['layerwise_acc']:.1f}% in {race['layerwise_s']:.1f} s; end-to-end: "
              f"{100 * race['end2end_acc']:.1f}% in {race['end2end_s']:.1f} s "
              f"({'reached' if race['end2end_reached_target'] else 'did not reach'} the target); "
              f"time ratio {race['ratio']:.2f}",
              f"SimCLR peer, same backbone, {peer['budget_s']:.1f} s: {100 * peer['simclr_acc']:.1f}% "
              f"(ours {100 * peer['ours_acc']:.1f}%)"]
    return "\n".join(lines)


def _pretrain_and_probe(config: PretrainConfig, source: torch.Tensor, target: ImageData, target_test: ImageData,
                        device: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        net = LayerwisePretrainer(config, Path(tmp), device, progress=False, tensorboard=False).fit(source)
        seconds = time.perf_counter() - start
    return seconds, probe_accuracy(net, target, target_test)


def _timed(step, steps: int, device: torch.device) -> float:
    step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
