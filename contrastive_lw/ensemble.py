"""Many transfer runs of one architecture trained at once, as one batched model.

A small classifier leaves a GPU waiting on kernel launches; M of them stacked
(``torch.func.stack_module_state``) and run through ``torch.func.vmap`` launch each kernel once
for all M (vmap batches a convolution over stacked weights as one grouped convolution). Each
member keeps its own parameters, BatchNorm buffers and Adam state (Adam is elementwise, so one
Adam over the stacked parameters is M separate ones), and sees the batches its separate
:func:`~contrastive_lw.transfer.train_transfer` run would see:

* a member's classifier is initialised as in its separate run (``torch.manual_seed(seed)``, then
  the new layers drawn), and so is its data order and augmentation: every distinct seed keeps its
  own copy of the global RNG state, swapped in to draw its epoch permutation and its random crops
  and flips (:func:`~contrastive_lw.transfer.random_crop_flip`) exactly as the separate run draws
  them. Members of the same seed share those draws (their separate runs draw the same numbers),
  members of different seeds each get their own batch: one gather per seed and step.
* the loss is the sum of the members' losses, so each member's gradient is its own run's.

So the ensemble equals the separate runs to float rounding (``tests/test_ensemble.py``: parameters,
BatchNorm buffers and test accuracy of 2 members x 3 steps). Modes ``frozen`` and ``finetune``
(with L2-SP and the per-layer learning rate); the linear modes train on cached features and gain
nothing. On CUDA the whole step (forward, backward, fused Adam of every member) is one CUDA graph
(:class:`~contrastive_lw.cudagraph.GraphedStep`); the augmentation runs eagerly before it, per seed.
An ensemble has no per-epoch resume: an interrupted group trains again from the start.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .checkpoint import restore_rng_state, rng_state
from .cudagraph import GraphedStep
from .data import ImageData
from .device import autocast, resolve_device
from .errors import ConfigError
from .heads import Classifier
from .blocks import BlockNet
from .runs import RunLogger
from .transfer import (ParamGroup, TransferConfig, TransferResult, _batches, _on_device, classifier, nonbinary_groups,
                       nonbinary_penalty, optimizer_groups, random_crop_flip, set_epoch_lr,
                       transfer_backbone)

if TYPE_CHECKING:
    from .study import Study, StudyData

ENSEMBLE_MODES = ("frozen", "finetune")


@contextlib.contextmanager
def seeded_stream(state: dict[str, torch.Tensor], device: torch.device) -> Iterator[None]:
    """Within the block the global RNG continues from ``state`` (which is then advanced to where
    the block left it); outside it the global RNG is as before."""
    saved = rng_state(device)
    restore_rng_state(state, device)
    try:
        yield
    finally:
        state.update(rng_state(device))
        restore_rng_state(saved, device)


def _member(source: BlockNet, config: TransferConfig, num_classes: int, image_size: int,
            device: torch.device) -> tuple[Classifier, dict[str, torch.Tensor]]:
    """The classifier a separate run of ``config`` starts from, and the RNG state it then has."""
    torch.manual_seed(config.seed)
    backbone = transfer_backbone(source, config.layers, config.reinit).to(device)
    return classifier(backbone, num_classes, config, image_size).to(device), rng_state(device)


def _check_members(models: Sequence[nn.Module], configs: Sequence[TransferConfig]) -> None:
    """All members must differ only in their seed and initial weights."""
    if not configs:
        raise ConfigError("an ensemble needs at least one member")
    if any(dataclasses.replace(c, seed=0) != dataclasses.replace(configs[0], seed=0) for c in configs):
        raise ConfigError("ensemble members must share one transfer config (all but the seed)")
    if configs[0].mode not in ENSEMBLE_MODES:
        raise ConfigError(f"an ensemble trains modes {list(ENSEMBLE_MODES)}, not {configs[0].mode!r}")
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in models]
    if any(s != shapes[0] for s in shapes):
        raise ConfigError("ensemble members must have the same architecture (their backbones differ)")


def train_transfer_ensemble(sources: Sequence[BlockNet], train: ImageData, test: ImageData,
                            configs: Sequence[TransferConfig], device: str = "auto",
                            loggers: Sequence[RunLogger | None] | None = None,
                            ) -> tuple[list[TransferResult], list[Classifier]]:
    """Train member i from ``sources[i]`` with ``configs[i]`` (configs equal but for the seed), as
    :func:`~contrastive_lw.transfer.train_transfer` would, all at once. Returns each member's
    result (``seconds``: the ensemble's wall time divided by the number of members) and its
    trained classifier.

    Example:
        >>> results, models = train_transfer_ensemble([net_a, net_b], train, test,  # doctest: +SKIP
        ...                                           [TransferConfig(seed=0), TransferConfig(seed=1)])
    """
    device_ = resolve_device(device)
    train, test = _on_device(train, device_), _on_device(test, device_)
    num_classes, size = len(train.class_names), train.images.shape[-1]
    members = [_member(s, c, num_classes, size, device_) for s, c in zip(sources, configs, strict=True)]
    models = [m for m, _ in members]
    _check_members(models, configs)
    config, count = configs[0], len(models)
    streams = {c.seed: state for c, (_, state) in zip(configs, members)}   # same seed: same draws
    seeds = list(streams)
    stream_of = torch.tensor([seeds.index(c.seed) for c in configs], device=device_)

    trainable = [name for name, p in models[0].named_parameters() if p.requires_grad]   # in the model's order
    params, buffers = stack_module_state(models)
    params = {name: p.detach().requires_grad_(name in trainable) for name, p in params.items()}
    template = copy.deepcopy(models[0]).to("meta")
    name_of = {id(p): name for name, p in models[0].named_parameters()}
    stacked = {group: ParamGroup([params[name_of[id(p)]] for p in members_group.penalised],
                                 [params[name_of[id(p)]] for p in members_group.norm])
               for group, members_group in nonbinary_groups(models[0], models[0].backbone.blocks, config.layers,
                                                            config.reinit).items()}  # as a separate run's
    anchor = [p.detach().clone() for p in stacked["transferred"].penalised]
    graphed = device_.type == "cuda"
    groups = optimizer_groups(stacked, config, device_ if graphed else None)
    optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay,
                                 **({"fused": True, "capturable": True} if graphed else {}))

    def logits(x: torch.Tensor, shared: bool) -> torch.Tensor:
        """M x B x classes: every member on its own batch (x: M x B x ...) or on one shared batch."""
        def one(p: dict, b: dict, images: torch.Tensor) -> torch.Tensor:
            return functional_call(template, (p, b), (images,))
        return vmap(one, in_dims=(0, 0, None if shared else 0))(params, buffers, x)

    def batch_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(device_):
            out = logits(x.index_select(0, stream_of), shared=False).float()
        loss = F.cross_entropy(out.transpose(1, 2), y.index_select(0, stream_of), reduction="none").mean(1).sum()
        return loss + nonbinary_penalty(stacked, anchor, config.l2sp if config.mode == "finetune" else 0.0, config.l2)

    step = GraphedStep(batch_loss, optimizer, config.batch_size, enabled=graphed, batch_dim=1)

    def train_epoch() -> None:
        template.train()
        if config.mode == "frozen":
            template.backbone.blocks[: config.layers].eval()  # re-initialised blocks train
        orders = []
        for seed in seeds:
            with seeded_stream(streams[seed], device_):
                orders.append(torch.randperm(len(train.images), device=device_).split(config.batch_size))
        for batch in zip(*orders):
            xs, ys = [], []
            for seed, index in zip(seeds, batch):
                with seeded_stream(streams[seed], device_):
                    images = train.images[index]
                    xs.append(random_crop_flip(images) if config.augment else images)
                    ys.append(train.labels[index])
            step(torch.stack(xs), torch.stack(ys))

    def evaluate() -> list[float]:
        template.eval()
        with torch.no_grad(), autocast(device_):
            predictions = torch.cat([logits(x, shared=True).argmax(2) for x, _ in _batches(test, 1024, device_)], 1)
        return (predictions == test.labels).float().mean(1).tolist()

    curves: list[list[float]] = [[] for _ in models]
    start = time.perf_counter()
    for epoch in range(config.epochs):
        set_epoch_lr(optimizer, config, epoch)
        train_epoch()
        for i, accuracy in enumerate(evaluate()):
            curves[i].append(accuracy)
            if loggers is not None and loggers[i] is not None:
                loggers[i].log(epoch + 1, {"epoch": epoch + 1, "test_acc": accuracy}, prefix="transfer/")
    seconds = (time.perf_counter() - start) / count
    for i, model in enumerate(models):
        model.load_state_dict({name: value[i] for name, value in {**params, **buffers}.items()})
    results = [TransferResult(c[-1], c, int(torch.tensor(c).argmax()) + 1, seconds) for c in curves]
    return results, models


def architecture(net: BlockNet, layers: int) -> tuple:
    """What members of one ensemble must share: the names and shapes of blocks 1..``layers``."""
    return tuple((name, tuple(value.shape)) for name, value in net.prefix(layers).state_dict().items())


def run_study_ensembles(study: Study, records: list[dict], data: StudyData, size: int) -> None:
    """Train the study's missing ``frozen`` / ``finetune`` cells as ensembles of up to ``size``
    members (one mode and depth, one architecture; the inits and seeds of the grid) and append
    their records to ``records`` (written to ``results.json`` after each ensemble), the records
    and run directories separate runs would write; there is no ``state.pt`` (no per-epoch resume)."""
    from .study import _key

    cfg, done = study.config, {_key(r) for r in records}
    cells: dict[tuple[str, int], list[tuple[str, int]]] = defaultdict(list)
    for seed, init, mode, k in itertools.product(cfg.seeds, cfg.inits, cfg.modes, cfg.layers):
        if mode in ENSEMBLE_MODES and (init, mode, k, seed) not in done:
            cells[mode, k].append((init, seed))
    for (mode, k), members in cells.items():
        by_arch: dict[tuple, list[tuple[str, int, BlockNet]]] = defaultdict(list)
        for init, seed in members:
            net = study._init(init, seed, data.source, data.source_test, data.target)
            by_arch[architecture(net, k)].append((init, seed, net))
        for group in by_arch.values():
            for start in range(0, len(group), size):
                _study_ensemble(study, records, data, mode, k, group[start:start + size])


def _study_ensemble(study: Study, records: list[dict], data: StudyData, mode: str, k: int,
                    group: list[tuple[str, int, BlockNet]]) -> None:
    """One ensemble of the study: train it, log each member in its run directory, add its records."""
    configs = [dataclasses.replace(study.config.transfer, mode=mode, layers=k, seed=seed) for _, seed, _ in group]
    with contextlib.ExitStack() as stack:
        loggers = [stack.enter_context(RunLogger(study.out_dir / f"seed{seed}" / "transfer" / f"{init}-{mode}-k{k}"))
                   for init, seed, _ in group]
        results, _ = train_transfer_ensemble([net for *_, net in group], data.target, data.target_test, configs,
                                             study.device, loggers)
    for (init, seed, _), result in zip(group, results):
        records.append({"init": init, "mode": mode, "layers": k, "seed": seed, **dataclasses.asdict(result)})
    study._write(records)
