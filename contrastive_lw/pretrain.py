"""Greedy layer-wise (and end-to-end) contrastive pretraining of a backbone (:mod:`contrastive_lw.blocks`)."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .augment import AugmentConfig, Augmentation, build_augmentation, to_float
from .checkpoint import (BACKBONE, deepest_layer, load_checkpoint, restore_rng_state, rng_state, save_backbone,
                         save_checkpoint)
from .config import from_dict, per_layer, to_dict
from .device import autocast, resolve_device
from .errors import CheckpointError, ConfigError, TrainingDiverged
from .losses import LossConfig, build_loss
from .accel.memory import on_huge_pages
from .backbones import BackboneConfig, canonical_spec, initial_backbone
from .blocks import BlockNet
from .checkpoint import saved_spec
from .heads import ProjectionHead
from .model import INIT_SCALE, ArchConfig, set_trainable
from .patches import NEGATIVES, POSITIVES, PatchIndex, PatchSampler, crop
from .runs import RunLogger

MODES = ("greedy", "end2end")
JOINT_SEED_OFFSET = 500  # the joint pass draws its patches apart from layer k's
TRAIN_STATE = "contrastive-lw/train-state"
HEAD_MAX_SIDE = 4  # a block's map wider than this is average-pooled to 4 x 4 before its projection head


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that shapes a pretraining run. Per-layer tuples repeat their last entry.

    ``backbone``: ``lw`` (the :class:`LayerwiseNet` of ``arch``) or a torchvision network
    (:mod:`contrastive_lw.backbones`; ``arch`` then unused). Without ``patch_sizes``, block k trains on
    patches of its receptive field while that is smaller than the images, else on two augmented
    views of the whole image (exemplar positives), and a block's map wider than 4 x 4 is
    average-pooled to 4 x 4 before its projection head.
    ``positives`` per layer: adjacent / shift / exemplar (see :class:`PatchSampler`); ``negative``:
    other_image (the paper's) or same_image, for losses that take explicit negatives (triplet).
    ``patch_sizes`` per layer; empty means the receptive field of blocks 1..k.
    ``crop_scales`` per layer: the random resized crop's area range of that layer's views, in place of
    ``augment.crop_scale`` (an empty entry, or none: that one).
    ``batch_size`` per layer: anchors per step (one int: every layer's).
    The state of the layer in progress is saved to ``state.pt`` every ``save_every`` steps (0: once
    per epoch of ``images * patches_per_image`` patches) and on SIGINT / SIGTERM; it is removed once the
    layer is saved as ``layerK.pt``.
    ``init_scale`` shrinks the ``lw`` conv weights' default initialisation, so that filter structure the
    loss does not act on (init noise) stays faint and the learned filters show.
    The defaults (in-batch softmax, lr 0.003) were chosen by the ablations in docs/STUDY.md; the
    paper's method is ``loss: {name: triplet}`` (cosine distance, margin 0.5, random negatives from
    other images, adjacent positives for block 1) at ``lr: 0.001`` (``experiments/configs/paper.yaml``
    pins the paper's schedule too, and no joint pass). The default lengths, ``epochs_per_layer`` (4, 1) with
    ``steps_per_layer`` (0, 0, 800) and ``batch_size`` (512, 512, 128), give block 1 four epochs (its
    7x7 patches are cheap, and its read-out rose ~1.5 points over one epoch), block 2 one, and block 3
    800 steps of 128 anchors (its 21x21 patches re-run the frozen blocks 1-2, many times the cost of a
    block-1 patch; small batches read out better than 512 for the same time), then a joint pass of
    blocks 1-3 (``joint_fraction`` 0.25: 200 steps, as long as the supervised baseline's time allows on
    a quiet machine; 600 steps lifted the frozen transfer of blocks 1 and 1-2 ~0.5 points, for 1.2x
    the supervised time).
    ``crop_scales`` ((1.0, 1.0), (0.2, 1.0)): block 1 does not crop (its 7x7 patches lose detail the later layers of a frozen
    transfer need: the frozen read-out of one block rose ~1 point), blocks 2 and up crop hard (their
    13x13 and 21x21 views cover much of a 32x32 image, the default crop barely changed them, and the
    harder one lifted the frozen read-out of two and three blocks by ~1 and ~2 points; docs/STUDY.md).
    Layer k trains the k-th entry of ``steps_per_layer`` (last repeats; one int is every layer's),
    or where that is empty or 0, ``epochs_per_layer`` (its k-th entry, last repeats) ``* images *
    patches_per_image / batch_size`` (layer k's) steps.
    End-to-end trains its one stage for the first entry.
    ``joint_fraction`` (greedy mode, two blocks or more; 0: none): after the last greedy block, blocks
    1..K and block K's projection head train together for that fraction of layer K's steps (at least
    one), on layer K's patches and batch (``joint_batch_size`` anchors per step instead, if > 0), at
    ``joint_lr`` (warm-up and cosine decay, as a layer), and the result replaces ``layerK.pt``: the
    lower blocks learn what the blocks above them use (docs/STUDY.md, ninth round).
    """

    arch: ArchConfig = field(default_factory=ArchConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mode: str = "greedy"
    positives: tuple[str, ...] = ("adjacent", "exemplar")
    negative: str = "other_image"
    max_shift: int = 2
    patch_sizes: tuple[int, ...] = ()
    crop_scales: tuple[tuple[float, ...], ...] = ((1.0, 1.0), (0.2, 1.0))
    init_scale: float = INIT_SCALE
    embed_dim: int = 128
    head_hidden: int = 0
    batch_size: tuple[int, ...] | int = (512, 512, 128)
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    epochs_per_layer: tuple[float, ...] | float = (4.0, 1.0)
    patches_per_image: int = 16
    steps_per_layer: tuple[int, ...] | int = (0, 0, 800)
    joint_fraction: float = 0.25
    joint_lr: float = 1e-3
    joint_batch_size: int = 0
    log_every: int = 50
    save_every: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, scalar, cast in (("steps_per_layer", int, int), ("batch_size", int, int),
                                   ("epochs_per_layer", (int, float), float)):
            if isinstance(getattr(self, name), scalar):  # one number: every layer's
                object.__setattr__(self, name, (cast(getattr(self, name)),))
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.negative not in NEGATIVES:
            raise ConfigError(f"negative must be one of {list(NEGATIVES)}, got {self.negative!r}")
        bad = [p for p in self.positives if p not in POSITIVES]
        if bad or not self.positives:
            raise ConfigError(f"positives must be among {list(POSITIVES)}, got {list(self.positives)}")
        for name in ("embed_dim", "patches_per_image", "log_every", "max_shift"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.joint_batch_size < 0:
            raise ConfigError(f"joint_batch_size must be >= 0 (0: layer K's batch), got {self.joint_batch_size}")
        if not self.batch_size or min(self.batch_size) < 1:
            raise ConfigError(f"batch_size must be positive integers (per layer), got {list(self.batch_size)}")
        for name in ("lr", "init_scale", "joint_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.epochs_per_layer or not min(self.epochs_per_layer) > 0:
            raise ConfigError(f"epochs_per_layer must be > 0, got {list(self.epochs_per_layer)}")
        if (self.save_every < 0 or min(self.steps_per_layer, default=0) < 0 or self.weight_decay < 0
                or self.joint_fraction < 0 or not 0 <= self.warmup_fraction < 1):
            raise ConfigError("steps_per_layer, joint_fraction, save_every and weight_decay must be >= 0, "
                              "warmup_fraction in [0, 1)")
        if any(p < 1 for p in self.patch_sizes):
            raise ConfigError(f"patch_sizes must be positive, got {list(self.patch_sizes)}")
        for k in range(1, len(self.crop_scales) + 1):
            try:
                self.layer_augment(k)  # AugmentConfig checks the crop
            except ConfigError as error:
                raise ConfigError(f"crop_scales: layer {k}'s entry (empty keeps augment.crop_scale): {error}") from None

    @classmethod
    def from_dict(cls, values: dict) -> PretrainConfig:
        return from_dict(cls, values, "pretrain config")

    def layer_batch_size(self, k: int) -> int:
        """Anchors per step of layer ``k`` (1-based; end-to-end's one stage is layer 1)."""
        return per_layer(self.batch_size, k)

    def epoch_steps(self, num_images: int, k: int = 1) -> int:
        """Steps of layer ``k`` that sample ``patches_per_image`` anchors per image once."""
        return max(1, math.ceil(num_images * self.patches_per_image / self.layer_batch_size(k)))

    def steps(self, num_images: int, k: int = 1) -> int:
        """Steps of layer ``k`` (1-based; end-to-end's one stage is layer 1)."""
        given = per_layer(self.steps_per_layer, k) if self.steps_per_layer else 0
        return given or max(1, math.ceil(per_layer(self.epochs_per_layer, k) * self.epoch_steps(num_images, k)))

    def layer_augment(self, k: int) -> AugmentConfig:
        """Layer ``k``'s augmentation: ``augment`` with the k-th entry of ``crop_scales`` (last repeats), if not empty."""
        scale = per_layer(self.crop_scales, k) if self.crop_scales else ()
        return dataclasses.replace(self.augment, crop_scale=scale) if scale else self.augment

    def first_blocks(self, k: int) -> PretrainConfig:
        """The same pretraining of the backbone's first ``k`` blocks only."""
        if self.backbone.name == "lw":
            return dataclasses.replace(self, arch=self.arch.truncated(k))
        return dataclasses.replace(self, backbone=dataclasses.replace(self.backbone, blocks=k))


def warmup_cosine(steps: int, warmup_fraction: float):
    """LambdaLR factor: linear warm-up, then cosine decay to 0."""
    warmup = max(1, int(steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return factor


def adamw(parameters: Iterable[nn.Parameter], lr: float, weight_decay: float,
          device: torch.device) -> torch.optim.AdamW:
    """The pretraining optimizer: AdamW, fused into one kernel per step on CPU and CUDA (on a CPU
    about 4x faster than the default multi-tensor version for a block and its head)."""
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=device.type in ("cpu", "cuda"))


@torch.no_grad()
def augmented_views(frames: torch.Tensor, where: list[PatchIndex], patch: int, augment: nn.Module,
                    columns: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """The ``patch``-sized crops of uint8 ``frames`` at each view's positions, stacked view after
    view, as augmented floats in [0, 1]: the input of one training step. ``columns`` (the global
    batch's size, and which of its samples these are): a data-parallel rank's share of the global
    batch's augmentation draws, so ranks together draw what one process would. Another module
    (kornia's) draws for its own samples only: there each rank draws from a generator seeded by
    the global one and its rank, so that ranks do not repeat each other's draws (nor match one process)."""
    where = PatchIndex(*map(torch.cat, zip(*where)))
    if isinstance(augment, Augmentation):
        return augment.cut(frames, where, patch, columns)  # one pass of a C kernel on the CPU
    patches = to_float(crop(frames, where, patch))
    if columns is None:
        return augment(patches)
    seed = int(torch.randint(0, 2 ** 62, ()))  # the same on every rank: their global generators stay in step
    device = patches.device
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed + distributed.rank())
        return augment(patches)


def rank_columns(views: int, batch_size: int) -> tuple[int, torch.Tensor] | None:
    """This rank's samples in a global batch of ``views`` x ``batch_size`` stacked views (None
    in a single process): its shard of every view."""
    if distributed.world_size() == 1:
        return None
    return views * batch_size, torch.arange(views * batch_size).view(views, batch_size)[
        :, distributed.shard(torch.arange(batch_size))].flatten()


def layer_patch(net: BlockNet, k: int, config: PretrainConfig, image_side: int) -> tuple[int, str]:
    """Patch side and positive kind of layer ``k``: the given ``patch_sizes`` entry, else block k's
    receptive field while it is smaller than the images, else the whole image with exemplar
    positives (two augmented views of it)."""
    positive = per_layer(config.positives, k)
    if config.patch_sizes:
        return per_layer(config.patch_sizes, k), positive
    field_side = net.receptive_field(k)
    if field_side < image_side:
        return field_side, positive
    if net.output_size(image_side, k) < 1:
        raise ConfigError(f"block {k}'s receptive field {field_side} is larger than the {image_side}x{image_side} "
                          "images and its output on them is empty: use fewer layers or smaller kernels")
    return image_side, "exemplar"


@torch.no_grad()
def frozen_features(net: BlockNet, x: torch.Tensor, prefix: int) -> torch.Tensor:
    """Patches (float in [0, 1]) through the network's normalisation and its first ``prefix``
    (frozen) blocks, without recording gradients."""
    return net(x, prefix)


def train_step(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               views: int, head: ProjectionHead | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One optimisation step on ``views`` stacked views (anchor, positive[, negative]) of a batch;
    returns the loss and the embeddings of each view. Given the model's ``head``, a loss that
    compares all pairs of the batch runs on the embeddings' coordinates in the head's output space
    where that is smaller (:meth:`ProjectionHead.output_basis`: the same loss and gradient)."""
    with autocast(x.device):
        embeddings = model(x).float()  # the loss in float32: similarities / temperature lose digits in bf16
    compact = head is not None and getattr(loss_fn, "compares_all_pairs", False)  # a loss of one's own: False
    basis = head.output_basis() if compact else None
    loss = loss_fn(*(embeddings if basis is None else embeddings @ basis).chunk(views))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, embeddings.chunk(views)


def std_of_l2_normalized(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the std of the L2-normalised embeddings B x D: 0 when they collapse
    to one vector, ~1/sqrt(D) when spread isotropically (lightly's collapse measure, computed here:
    importing ``lightly.utils.debug`` for it added ~0.8 s to every run)."""
    return F.normalize(z, dim=1).std(dim=0).mean()


class Interrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM arrived; the layer in progress was saved and the same command resumes it."""


class Stage(nn.Module):
    """What one pretraining stage trains: blocks ``first``..``k`` of ``net`` and a new projection
    head on block k's map of side ``side``, average-pooled to ``HEAD_MAX_SIDE`` where wider."""

    def __init__(self, net: BlockNet, first: int, k: int, side: int, embed_dim: int = 128, hidden: int = 0) -> None:
        super().__init__()
        pooled = min(side, HEAD_MAX_SIDE)
        self.blocks = net.blocks[first - 1: k]
        self.head = ProjectionHead(net.out_channels(k) * pooled * pooled, embed_dim, hidden)
        self.pool = pooled if side > HEAD_MAX_SIDE else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        return self.head(x if self.pool is None else F.adaptive_avg_pool2d(x, self.pool))


class LayerwisePretrainer:
    """Trains blocks 1..K of a backbone without labels and checkpoints each one.

    Greedy mode: for k = 1..K, blocks < k are frozen (eval mode, no gradients), block k and a new
    projection head k train on patches of block k's receptive field, then ``layerK.pt`` is saved.
    End-to-end mode: the same loop once, all K blocks trainable on the full receptive field.
    With ``joint_fraction`` a joint pass over blocks 1..K follows the greedy ones (:class:`PretrainConfig`).
    Running again into the same directory continues after the last finished layer, and inside the
    layer in progress from its last saved step (``state.pt``), bit for bit as if never stopped.
    Under ``torchrun`` the run is data-parallel (DDP): every rank draws the same global batch of
    patch positions and embeds its own slice; only rank 0 writes files.

    Example:
        >>> trainer = LayerwisePretrainer(PretrainConfig(steps_per_layer=10), "runs/demo")  # doctest: +SKIP
        >>> net = trainer.fit(images)                                                      # doctest: +SKIP
    """

    def __init__(self, config: PretrainConfig, out_dir: str | Path, device: str = "auto",
                 progress: bool | None = None, tensorboard: bool = True) -> None:
        self.config, self.out_dir = config, Path(out_dir)
        self.device = distributed.init_distributed(resolve_device(device))
        if any(batch % distributed.world_size() for batch in config.batch_size):
            raise ConfigError(f"batch_size {list(config.batch_size)} must divide evenly over "
                              f"{distributed.world_size()} processes")
        self.progress, self.tensorboard = progress, tensorboard
        self.loss_fn = build_loss(config.loss, gather_distributed=distributed.world_size() > 1).to(self.device)
        self._stop_signal: int | None = None

    def fit(self, images: torch.Tensor) -> BlockNet:
        """Pretrain on uint8 images N x C x H x W, or video clips N x T x C x H x W (then the
        positive is the anchor's place in the clip's last frame); returns the trained network."""
        cfg = self.config
        if images.dim() not in (4, 5) or images.dtype != torch.uint8:
            raise ConfigError(f"images must be uint8 N x C x H x W (or clips N x T x C x H x W), got "
                              f"{images.dtype} {tuple(images.shape)}")
        net = self.initial_network(images)
        if images.shape[-3] != net.in_channels:
            raise ConfigError(f"images have {images.shape[-3]} channels but the backbone takes {net.in_channels}: "
                              f"{'set arch.in_channels to match' if cfg.backbone.name == 'lw' else 'convert them to RGB'}")
        done, joined = self._resume(net)
        net = net.to(self.device, memory_format=torch.channels_last)
        images = images.to(self.device)
        stages = range(done + 1, net.num_blocks + 1) if cfg.mode == "greedy" else (
            [net.num_blocks] if done < net.num_blocks else [])
        logger = RunLogger(self.out_dir, self.tensorboard)
        with logger, _catch_signals(self):
            for k in stages:
                self._train_layer(net, k, images, logger)
            if cfg.mode == "greedy" and cfg.joint_fraction and net.num_blocks > 1 and not joined:
                self._train_layer(net, net.num_blocks, images, logger, joint=True)
        return net.cpu()

    def initial_network(self, images: torch.Tensor) -> BlockNet:
        """The network as :meth:`fit` draws it before any training: seeded, its input normalised
        by ``images``' channel statistics (ImageNet's for pretrained torchvision weights), every
        ``lw`` conv weight scaled by ``init_scale`` (:func:`~contrastive_lw.backbones.initial_backbone`)."""
        cfg = self.config
        return initial_backbone(cfg.backbone, cfg.arch, images.flatten(0, -4), cfg.seed, cfg.init_scale)

    def _resume(self, net: BlockNet) -> tuple[int, bool]:
        """Load the deepest finished layer of the run directory; returns how many blocks it holds
        and whether the joint pass trained them."""
        path = deepest_layer(self.out_dir)
        if path is None:
            return 0, False
        payload = load_checkpoint(path, BACKBONE)
        if canonical_spec(saved_spec(payload)) != canonical_spec(net.spec):
            raise CheckpointError(f"{path} was written for another architecture: use a new --out")
        net.load_state_dict(payload["backbone"])
        return payload["trained_blocks"], "joint_steps" in payload.get("metrics", {})

    def _train_layer(self, net: BlockNet, k: int, images: torch.Tensor, logger: RunLogger,
                     joint: bool = False) -> None:
        """Train layer ``k`` (greedy: block k; end-to-end: blocks 1..k), or with ``joint`` blocks
        1..k from the greedy ones and layer k's head, then save ``layerK.pt``."""
        cfg, device = self.config, self.device
        patch, positive = layer_patch(net, k, cfg, min(images.shape[-2:]))
        side = net.output_size(patch, k)
        if side < 1:
            raise ConfigError(f"{patch}x{patch} patches are smaller than block {k}'s receptive field "
                              f"{net.receptive_field(k)}: raise patch_sizes")
        greedy = cfg.mode == "greedy" and not joint
        prefix = k - 1 if greedy else 0
        name = "joint" if joint else f"layer {k}"
        set_trainable(net.blocks[:prefix], False)
        seed = cfg.seed * 1000 + k + (JOINT_SEED_OFFSET if joint else 0)
        torch.manual_seed(seed)  # before the head is drawn: a run resumed between layers draws the same
        stage = Stage(net, prefix + 1, k, side, cfg.embed_dim, cfg.head_hidden).to(device)
        if joint:  # layer k's head, as its greedy stage left it
            stage.head.load_state_dict(load_checkpoint(self.out_dir / f"layer{k}.pt", BACKBONE)["head"])
        set_trainable(stage, True)
        optimizer = adamw(stage.parameters(), cfg.joint_lr if joint else cfg.lr, cfg.weight_decay, device)
        stage_k = 1 if cfg.mode == "end2end" else k
        steps = cfg.steps(len(images), stage_k)
        steps = max(1, round(cfg.joint_fraction * steps)) if joint else steps
        batch = (cfg.joint_batch_size if joint else 0) or cfg.layer_batch_size(stage_k)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, cfg.warmup_fraction))
        sampler = PatchSampler(patch, positive, cfg.max_shift, seed=seed, device=device, negative=cfg.negative)
        augment = build_augmentation(cfg.layer_augment(k), net.in_channels).to(device)
        first, final_loss = self._load_state(k, net, stage, optimizer, scheduler, sampler)
        model = nn.parallel.DistributedDataParallel(stage) if distributed.world_size() > 1 else stage
        views = 3 if self.loss_fn.uses_negatives else 2
        save_every = cfg.save_every or cfg.epoch_steps(len(images), stage_k)
        bar = tqdm(range(first, steps), desc=name, initial=first, total=steps,
                   disable=not distributed.is_main_process() or (None if self.progress is None else not self.progress))
        start = time.perf_counter()
        frames = on_huge_pages(images.flatten(0, -4).contiguous(memory_format=torch.channels_last))  # fast crops
        draw = sampler.sample_video_indices if images.dim() == 5 else sampler.sample_indices
        columns = rank_columns(views, batch)
        for step in bar:
            where = [PatchIndex(*map(distributed.shard, w)) for w in draw(images.shape, batch, device)[:views]]
            x = frozen_features(net, augmented_views(frames, where, patch, augment, columns), prefix)
            loss, embeddings = train_step(model, self.loss_fn, optimizer, x, views, stage.head)
            scheduler.step()
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                self._log(logger, k, joint, step, loss, embeddings, scheduler.get_last_lr()[0],
                          (step + 1 - first) * views * batch / (time.perf_counter() - start), bar)
            if step + 1 < steps and (self._stop_signal is not None or (step + 1) % save_every == 0):
                self._save_state(k, step + 1, net, stage, optimizer, scheduler, sampler, loss.item())
                self._stop_if_asked(f"in {name} at step {step + 1}")
        final_loss = loss.item() if first < steps else final_loss  # else resumed at the layer's end
        self._save_layer(net, stage.head, k, joint, steps, time.perf_counter() - start, final_loss)
        if prefix == 0 and distributed.is_main_process():  # this stage trained block 1
            self._save_filters(net, logger)
        self._stop_if_asked(f"after {name}")  # a signal in the stage's last step: the layer is saved whole

    def _stop_if_asked(self, where: str) -> None:
        if self._stop_signal is not None:
            raise Interrupted(f"stopped by signal {self._stop_signal} {where}; run the same command again to continue")

    def _load_state(self, k: int, net: BlockNet, stage: Stage, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, sampler: PatchSampler) -> tuple[int, float]:
        """Restore the layer (or joint pass) in progress from ``state.pt``; returns the step to
        continue from and the loss of the step before it (NaN when there is none)."""
        path = self.out_dir / "state.pt"
        if not path.exists():
            return 0, math.nan
        state = load_checkpoint(path, TRAIN_STATE)
        if state["layer"] != k or not _same_config(state["config"], self.config):
            raise CheckpointError(f"{path} belongs to another layer or config: delete it to restart layer {k}")
        net.load_state_dict(state["backbone"])
        stage.head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.generator.set_state(state["sampler_rng"])
        restore_rng_state(state, self.device)
        return state["step"], state.get("loss", math.nan)

    def _save_state(self, k: int, step: int, net: BlockNet, stage: Stage, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, sampler: PatchSampler, loss: float) -> None:
        """Save the stage in progress (layer ``k``'s, or the joint pass once ``layerK.pt`` exists:
        each stage removes ``state.pt`` when it saves its layer)."""
        if distributed.is_main_process():
            state = {
                "kind": TRAIN_STATE, "layer": k, "step": step, "loss": loss, "config": to_dict(self.config),
                "backbone": _cpu(net.state_dict()), "head": _cpu(stage.head.state_dict()),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "sampler_rng": sampler.generator.get_state(), **rng_state(self.device),
            }
            save_checkpoint(state, self.out_dir / "state.pt")
        distributed.barrier()

    def _log(self, logger: RunLogger, k: int, joint: bool, step: int, loss: torch.Tensor,
             embeddings: tuple[torch.Tensor, ...], lr: float, patches_per_s: float, bar: tqdm) -> None:
        """Log a step of layer ``k`` (or of the joint pass that follows it)."""
        value = loss.item()
        if not math.isfinite(value):
            stage = "joint pass" if joint else f"layer {k}"
            raise TrainingDiverged(f"{stage}: loss became {value} at step {step + 1}; finished layers are "
                                   f"kept in {self.out_dir}: lower --lr and run the same command again")
        anchor, positive = embeddings[0].detach(), embeddings[1].detach()
        row = {
            "layer": k, "layer_step": step + 1, "loss": value, "lr": lr,
            "pos_cos": float(F.cosine_similarity(anchor, positive).mean()),
            "embedding_std": float(std_of_l2_normalized(anchor)),
            "patches_per_s": patches_per_s,
        }
        if len(embeddings) == 3:
            row["neg_cos"] = float(F.cosine_similarity(anchor, embeddings[2].detach()).mean())
        if joint:
            row["joint"] = True
        logger.log((k - 1 + joint) * 1_000_000 + step + 1, row, prefix="joint/" if joint else f"layer{k}/")
        bar.set_postfix(loss=f"{value:.4f}")

    def _save_layer(self, net: BlockNet, head: nn.Module, k: int, joint: bool, steps: int,
                    seconds: float, loss: float) -> None:
        """Write ``layerK.pt``; after the joint pass its metrics keep the greedy layer's and add
        ``joint_steps`` / ``joint_seconds`` / ``joint_final_loss``."""
        if distributed.is_main_process():
            path = self.out_dir / f"layer{k}.pt"
            metrics = {"steps": steps, "seconds": seconds, "final_loss": loss}
            if joint:
                metrics = {**load_checkpoint(path, BACKBONE)["metrics"],
                           **{f"joint_{name}": value for name, value in metrics.items()}}
            save_backbone(path, net, self.config.mode, trained_blocks=k,
                          config=to_dict(self.config), head=_cpu(head.state_dict()), metrics=metrics)
            (self.out_dir / "state.pt").unlink(missing_ok=True)
        distributed.barrier()

    def _save_filters(self, net: BlockNet, logger: RunLogger) -> None:
        from .visualize import filter_grid, save_filter_grid

        weight = net.first_conv().weight
        logger.image("filters/layer1", filter_grid(weight))
        how = "layer-wise" if self.config.mode == "greedy" else "end-to-end"
        save_filter_grid(weight, self.out_dir / "filters_layer1.png", f"block-1 filters ({how}, unsupervised)")


def _same_config(saved: dict, config: PretrainConfig) -> bool:
    """Whether a saved config dict describes ``config`` (older spellings, such as one int for
    ``steps_per_layer``, read as today's)."""
    try:
        return PretrainConfig.from_dict(saved) == config
    except ConfigError:
        return False


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu() for name, tensor in state.items()}


@contextlib.contextmanager
def _catch_signals(trainer: LayerwisePretrainer):
    """While training, SIGINT / SIGTERM ask the loop to save its state and stop after the step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum: int, frame: object) -> None:
        trainer._stop_signal = signum
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
