"""Transfer the first k pretrained blocks into a classifier: frozen, fine-tuned or linearly probed."""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .backbones import TORCHVISION, TORCHVISION_PREFIX, BackboneConfig, build_backbone
from .blocks import BlockNet
from .checkpoint import (BACKBONE, deepest_layer, load_backbone, load_checkpoint, restore_rng_state, rng_state,
                         save_checkpoint)
from .config import from_dict, to_dict
from .data import ImageData
from .cudagraph import GraphedStep
from .device import autocast, resolve_device
from .errors import CheckpointError, ConfigError
from .evaluate import block_features, fit_linear_svm, standardize
from .head2toe import Head2ToeConfig
from .heads import Classifier
from .model import ArchConfig, reset_parameters, set_trainable
from .patches import PatchIndex, crop
from .runs import RunLogger

MODES = ("frozen", "finetune", "linear", "head2toe", "svm")
TRANSFER_STATE = "contrastive-lw/transfer-state"
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TransferConfig:
    """How a classifier is trained on top of ``layers`` transferred blocks.

    * ``frozen``: transferred blocks fixed (eval mode), the new blocks and fc layers train;
    * ``finetune``: everything trains; transferred blocks use ``lr * layer_lr_ratio`` and an
      L2-SP penalty ``l2sp/2 * ||w - w_pretrained||^2``;
    * non-binary (Plested, Shen & Gedeon 2021, frozen or finetune): the ``reinit`` blocks after the
      transferred ones are kept in place but re-initialised, train at ``lr * reinit_lr_ratio`` and,
      with the new layers (at ``lr``), carry plain L2 ``l2/2 * ||w||^2``; BatchNorm parameters
      carry neither penalty (:func:`nonbinary_groups`, :func:`nonbinary_penalty`);
    * ``linear``: a linear classifier on the transferred blocks' features average-pooled to
      ``pool`` x ``pool`` (of every transferred block, concatenated, when ``all_blocks``), which are
      computed once and cached;
    * ``head2toe``: Head2Toe as published (:mod:`contrastive_lw.head2toe`, settings ``head2toe``):
      every transferred block's (and residual unit's) features pooled to about
      ``head2toe.target_size`` values and L2-normalised per layer, the ``head2toe.keep_fraction``
      chosen by a group-lasso fit (``head2toe.group_lasso``), a fresh linear head retrained on them;
      both fits run ``head2toe.steps`` batches at ``head2toe.lr`` (cosine decay), the retrain
      evaluated ``epochs`` times along the way; its wall time includes the features and the selection;
    * ``svm``: a linear SVM (scikit-learn ``LinearSVC``) on the ``linear`` mode's features, its C
      chosen on a validation split of the training set (:func:`~contrastive_lw.evaluate.fit_linear_svm`).
    Training: Adam, batches of random pad-4 crops + horizontal flips (``augment``); ``lr_schedule``
    ``constant`` keeps every group's learning rate, ``cosine`` decays it per epoch from its value to
    0 (epoch e of E trains at ``(1 + cos(pi e / E)) / 2`` of it; frozen, finetune and linear modes).
    """

    mode: str = "finetune"
    layers: int = 1
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    layer_lr_ratio: float = 1.0
    l2sp: float = 0.0
    reinit: int = 0
    reinit_lr_ratio: float = 1.0
    l2: float = 0.0
    new_widths: tuple[int, ...] = (512,)
    hidden: int = 512
    pool: int = 4
    all_blocks: bool = True
    head2toe: Head2ToeConfig = Head2ToeConfig()
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"transfer mode must be one of {list(MODES)}, got {self.mode!r}")
        for name in ("layers", "epochs", "batch_size", "pool"):
            if getattr(self, name) < 1:
                raise ConfigError(f"transfer.{name} must be a positive integer, got {getattr(self, name)}")
        if self.lr <= 0 or min(self.layer_lr_ratio, self.l2sp, self.weight_decay, self.reinit,
                                self.reinit_lr_ratio, self.l2) < 0:
            raise ConfigError("transfer.lr must be > 0; layer_lr_ratio, l2sp, weight_decay, reinit, "
                              "reinit_lr_ratio and l2 >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"transfer.lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.reinit and self.mode in ("linear", "head2toe"):
            raise ConfigError(f"transfer.reinit applies to the frozen and finetune modes, not {self.mode}")

    @classmethod
    def from_dict(cls, values: dict) -> TransferConfig:
        return from_dict(cls, values, "transfer config")


@dataclass
class TransferResult:
    """Test accuracy after the last epoch, the per-epoch test curve, its best epoch, wall time;
    Head2Toe: each layer's name -> [features kept, features it has]."""

    test_acc: float
    curve: list[float]
    best_epoch: int
    seconds: float
    head2toe_kept: dict[str, list[int]] | None = None


def transfer_backbone(source: BlockNet, layers: int, reinit: int = 0) -> BlockNet:
    """A trainable copy of the first ``layers`` blocks of ``source`` followed by its next ``reinit``
    blocks with freshly drawn weights (from the global RNG)."""
    if not 1 <= layers <= source.num_blocks:
        raise ConfigError(f"cannot transfer {layers} layers: the initialisation has {source.num_blocks} "
                          "trained block(s); pretrain more layers or transfer fewer")
    if layers + reinit > source.num_blocks:
        raise ConfigError(f"cannot transfer {layers} and re-initialise {reinit} more block(s): the backbone "
                          f"has {source.num_blocks}; lower --reinit")
    backbone = copy.deepcopy(source.prefix(layers + reinit))
    reset_parameters(backbone.blocks[layers:])
    return backbone


def classifier(backbone: BlockNet, num_classes: int, config: TransferConfig, image_size: int) -> Classifier:
    """The transfer classifier of ``config`` on ``backbone`` (its transferred blocks frozen in
    frozen mode; re-initialised blocks always train)."""
    model = Classifier(backbone, num_classes, config.new_widths, config.hidden, image_size)
    if config.mode == "frozen":
        set_trainable(backbone.blocks[: config.layers], False)
    return model


def optimizer_groups(param_groups: dict[str, ParamGroup], config: TransferConfig,
                     lr_device: torch.device | None = None) -> list[dict]:
    """Adam's parameter groups: each non-binary group's trainable parameters at its learning rate
    (head ``lr``; re-initialised ``lr * reinit_lr_ratio``; transferred ``lr * layer_lr_ratio``), a
    tensor on ``lr_device`` when given (a captured CUDA graph reads the lr a schedule writes there)."""
    ratios = {"head": 1.0, "reinit": config.reinit_lr_ratio, "transferred": config.layer_lr_ratio}
    lrs = {name: config.lr * ratio for name, ratio in ratios.items()}
    return [{"params": [p for p in g.params if p.requires_grad],
             "lr": lrs[name] if lr_device is None else torch.tensor(lrs[name], device=lr_device)}
            for name, g in param_groups.items() if any(p.requires_grad for p in g.params)]


def set_epoch_lr(optimizer: torch.optim.Optimizer, config: TransferConfig, epoch: int) -> None:
    """Every group's learning rate for ``epoch`` (0-based) under ``config.lr_schedule``, scaled from
    its ``initial_lr`` (the lr it had at the first call; kept in the optimizer's state dict)."""
    factor = 1.0 if config.lr_schedule == "constant" else (1 + math.cos(math.pi * epoch / config.epochs)) / 2
    for group in optimizer.param_groups:
        lr = group.setdefault("initial_lr", float(group["lr"])) * factor
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def train_transfer(source: BlockNet, train: ImageData, test: ImageData, config: TransferConfig,
                   device: str = "auto", logger: RunLogger | None = None,
                   state_path: str | Path | None = None) -> tuple[TransferResult, nn.Module]:
    """Train a classifier on ``train`` from the first ``config.layers`` blocks of ``source``;
    evaluate on ``test`` after every epoch. Returns the result and the trained model.

    With ``state_path`` the model, optimizer, RNG and curve are saved there after every epoch, and
    a run started again with the same config continues after the last saved epoch (a finished
    one returns at once). Under ``torchrun`` the classifier trains data-parallel (DDP): every rank
    draws the same global batch and trains on its slice; only rank 0 writes."""
    device_ = distributed.init_distributed(resolve_device(device))
    torch.manual_seed(config.seed)
    train, test = _on_device(train, device_), _on_device(test, device_)  # once, not per epoch
    backbone = transfer_backbone(source, config.layers, config.reinit).to(device_)
    num_classes = len(train.class_names)
    if config.mode in ("linear", "head2toe", "svm"):
        return _train_linear(backbone, train, test, num_classes, config, device_, logger, state_path)
    model = classifier(backbone, num_classes, config, train.images.shape[-1])
    model = model.to(device_, memory_format=torch.channels_last)  # as the backbone's normalised input
    param_groups = nonbinary_groups(model, backbone.blocks, config.layers, config.reinit)
    anchor = [p.detach().clone() for p in param_groups["transferred"].penalised]
    graphed = device_.type == "cuda" and distributed.world_size() == 1
    groups = optimizer_groups(param_groups, config, device_ if graphed else None)
    optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay,
                                 **({"fused": True, "capturable": True} if graphed else {}))
    parallel = nn.parallel.DistributedDataParallel(model) if distributed.world_size() > 1 else model

    def penalty() -> torch.Tensor | float:
        return nonbinary_penalty(param_groups, anchor, config.l2sp if config.mode == "finetune" else 0.0, config.l2)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad(), autocast(device_):
            predictions = torch.cat([model(x).argmax(1) for x, _ in _batches(test, 1024, device_)])
        return float((predictions == test.labels).float().mean())

    def batch_loss(index: torch.Tensor) -> torch.Tensor:
        x = random_crop_flip(train.images[index]) if config.augment else train.images[index]
        with autocast(device_):
            return F.cross_entropy(parallel(distributed.shard(x)).float(), distributed.shard(train.labels[index])) + penalty()

    step = GraphedStep(batch_loss, optimizer, config.batch_size, enabled=graphed)

    def train_epoch(epoch: int) -> None:
        set_epoch_lr(optimizer, config, epoch)
        model.train()
        if config.mode == "frozen":
            backbone.blocks[: config.layers].eval()
        for index in torch.randperm(len(train.images), device=device_).split(config.batch_size):
            step(index)
    return _fit(model, optimizer, train_epoch, evaluate, config, logger, state_path), model


def _train_linear(backbone: BlockNet, train: ImageData, test: ImageData, num_classes: int,
                  config: TransferConfig, device: torch.device, logger: RunLogger | None,
                  state_path: str | Path | None) -> tuple[TransferResult, nn.Module]:
    """Linear classifier on cached, standardised, pooled block features (Head2Toe: :func:`_train_head2toe`)."""
    if config.mode == "head2toe":
        return _train_head2toe(backbone, train, test, num_classes, config, device, logger, state_path)
    blocks = list(range(1, config.layers + 1)) if config.all_blocks else config.layers
    train_x = block_features(backbone, train.images, blocks, config.pool).to(device)
    test_x = block_features(backbone, test.images, blocks, config.pool).to(device)
    train_x, test_x = standardize(train_x, test_x)
    train_y, test_y = train.labels.to(device), test.labels.to(device)
    if config.mode == "svm":
        return _svm_result(train_x, train_y, test_x, test_y, config.seed)
    linear = nn.Linear(train_x.shape[1], num_classes).to(device)
    optimizer = torch.optim.Adam(linear.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def train_epoch(epoch: int) -> None:
        set_epoch_lr(optimizer, config, epoch)
        for index in torch.randperm(len(train_x), device=device).split(config.batch_size):
            loss = F.cross_entropy(linear(train_x[index]), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def evaluate() -> float:
        with torch.no_grad():
            return float((linear(test_x).argmax(1) == test_y).float().mean())
    return _fit(linear, optimizer, train_epoch, evaluate, config, logger, state_path), linear


def _train_head2toe(backbone: BlockNet, train: ImageData, test: ImageData, num_classes: int,
                    config: TransferConfig, device: torch.device, logger: RunLogger | None,
                    state_path: str | Path | None) -> tuple[TransferResult, nn.Module]:
    """Head2Toe: select features of every layer by group lasso, then retrain a fresh linear head on
    them for ``head2toe.steps`` batches, evaluated ``epochs`` times along the way."""
    from .head2toe import batch_order, layer_features, linear_head, select_features, train_steps

    start, h2t = time.perf_counter(), config.head2toe
    train_x, sizes = layer_features(backbone, train.images, h2t.target_size, h2t.units)
    train_y, test_y = train.labels.to(device), test.labels.to(device)
    selection = select_features(train_x.to(device), train_y, sizes, h2t, config.batch_size, config.seed)
    train_x = selection.apply(train_x).to(device)
    test_x = selection.apply(layer_features(backbone, test.images, h2t.target_size, h2t.units)[0]).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    linear = linear_head(train_x.shape[1], num_classes, generator).to(device)
    optimizer = torch.optim.Adam(linear.parameters(), lr=h2t.lr)
    order = batch_order(len(train_x), config.batch_size, h2t.steps, generator)
    chunks = torch.arange(h2t.steps).tensor_split(config.epochs)
    prepared = time.perf_counter() - start

    def evaluate() -> float:
        with torch.no_grad():
            return float((linear(test_x).argmax(1) == test_y).float().mean())
    result = _fit(linear, optimizer, lambda epoch: train_steps(linear, optimizer, train_x, train_y, order,
                                                               chunks[epoch], h2t.lr),
                  evaluate, config, logger, state_path)
    kept = {name: [count, sizes[name]] for name, count in selection.counts().items()}
    return dataclasses.replace(result, seconds=result.seconds + prepared, head2toe_kept=kept), linear


def _svm_result(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                seed: int) -> tuple[TransferResult, nn.Module]:
    """Fit :func:`~contrastive_lw.evaluate.fit_linear_svm`; the result and its decision function as an ``nn.Linear``."""
    start = time.perf_counter()
    svm = fit_linear_svm(train_x, train_y, seed=seed)
    weight = torch.as_tensor(svm.coef_, dtype=torch.float32)
    bias = torch.as_tensor(svm.intercept_, dtype=torch.float32)
    if len(weight) == 1:  # two classes: one decision function w.x + b, as logits (-f/2, f/2)
        weight, bias = torch.cat([-weight, weight]) / 2, torch.cat([-bias, bias]) / 2
    linear = nn.Linear(weight.shape[1], weight.shape[0]).to(train_x.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
        accuracy = float((linear(test_x).argmax(1) == test_y).float().mean())
    return TransferResult(accuracy, [accuracy], 1, time.perf_counter() - start), linear


def _fit(model: nn.Module, optimizer: torch.optim.Optimizer, train_epoch: Callable[[int], None],
         evaluate: Callable[[], float], config: TransferConfig, logger: RunLogger | None,
         state_path: str | Path | None) -> TransferResult:
    """The epoch loop: train, evaluate, log, save the resumable state."""
    first, curve, seconds = 0, [], 0.0
    device = next(model.parameters()).device
    if state_path is not None and Path(state_path).exists():
        state = load_checkpoint(state_path, TRANSFER_STATE)
        if state["config"] != to_dict(config):
            raise CheckpointError(f"{state_path} was saved with another transfer config: delete it or use a new --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state, device)
        first, curve, seconds = state["epoch"], state["curve"], state["seconds"]
    start = time.perf_counter()
    for epoch in range(first, config.epochs):
        train_epoch(epoch)
        curve.append(evaluate())
        if logger is not None:
            logger.log(epoch + 1, {"epoch": epoch + 1, "test_acc": curve[-1]}, prefix="transfer/")
        if state_path is not None and distributed.is_main_process():
            save_checkpoint({"kind": TRANSFER_STATE, "config": to_dict(config), "epoch": epoch + 1, "curve": curve,
                             "seconds": seconds + time.perf_counter() - start, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), **rng_state(device)}, state_path)
    return TransferResult(curve[-1], curve, int(torch.tensor(curve).argmax()) + 1,
                          seconds + time.perf_counter() - start)


def _on_device(data: ImageData, device: torch.device) -> ImageData:
    return ImageData(data.images.to(device), data.labels.to(device), data.class_names)


def _batches(data: ImageData, batch_size: int, device: torch.device):
    """(images, labels) batches, in order, of data already on ``device``."""
    for index in torch.arange(len(data.images), device=device).split(batch_size):
        yield data.images[index], data.labels[index]


def random_crop_flip(images: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Per-image random crops of the zero-padded batch, back to its size, and horizontal flips."""
    n, _, height, width = images.shape
    padded = F.pad(images, (padding,) * 4)
    top = torch.randint(0, 2 * padding + 1, (n,), device=images.device)
    left = torch.randint(0, 2 * padding + 1, (n,), device=images.device)
    cropped = crop(padded, PatchIndex(torch.arange(n, device=images.device), top, left), height)
    flip = torch.rand(n, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


def load_init(init: str | Path, target_images: torch.Tensor, arch: ArchConfig | None = None,
              backbone: BackboneConfig | None = None) -> tuple[str, BlockNet]:
    """The starting network for ``init``: ``random`` (the ``backbone`` / ``arch`` network, drawn from
    the global RNG), ``torchvision:NAME`` (that torchvision network with ``backbone``'s stem and
    weights), or a run directory / checkpoint (layer-wise, end-to-end or supervised). A network
    without trained normalisation is normalised on ``target_images``. Returns (name, network)."""
    backbone = backbone or BackboneConfig()
    if str(init) == "random":
        net = build_backbone(backbone, arch)
    elif str(init).startswith(TORCHVISION_PREFIX):
        name = str(init)[len(TORCHVISION_PREFIX):]
        if name not in TORCHVISION:
            raise ConfigError(f"--init {init}: choose one of {', '.join(TORCHVISION_PREFIX + n for n in TORCHVISION)}")
        net = build_backbone(dataclasses.replace(backbone, name=name, blocks=0))
    else:
        path = Path(init)
        if path.is_dir() and (deepest := deepest_layer(path)) is not None:
            path = deepest
        mode = load_checkpoint(path, BACKBONE).get("mode", "greedy")
        return {"greedy": "layerwise"}.get(mode, mode), load_backbone(path)
    net.set_normalization(target_images)
    return str(init), net


@dataclass
class ParamGroup:
    """One learning-rate group of the non-binary fine-tune: ``penalised`` parameters carry its weight
    penalty, ``norm`` ones (BatchNorm) none; ``params`` is both."""

    penalised: list[nn.Parameter]
    norm: list[nn.Parameter]

    @property
    def params(self) -> list[nn.Parameter]:
        return [*self.penalised, *self.norm]


def nonbinary_groups(model: nn.Module, blocks: nn.Sequential, transferred: int,
                     reinit: int = 0) -> dict[str, ParamGroup]:
    """The parameters of ``model`` in the three groups of the non-binary fine-tune (Plested, Shen &
    Gedeon 2021, arXiv 2107.08585; official code XuyangShen/Non-binary-deep-transfer-learning-for-
    image-classification, ``timm/optim/optim_factory.py::add_different_lrs``): ``transferred``
    (``blocks[:transferred]``), ``reinit`` (the next ``reinit`` blocks) and ``head`` (every other
    parameter of ``model``: new blocks and fully-connected layers). Each is split into penalised
    parameters and BatchNorm ones, which that code's ``L2SP`` leaves out of both penalties."""
    parts = {"transferred": list(blocks[:transferred].modules()),
             "reinit": list(blocks[transferred: transferred + reinit].modules())}
    taken = {id(p) for modules in parts.values() for m in modules for p in m.parameters(recurse=False)}
    parts["head"] = list(model.modules())
    groups = {}
    for name in ("head", "reinit", "transferred"):
        penalised, norm = [], []
        for module in parts[name]:
            own = [p for p in module.parameters(recurse=False) if name != "head" or id(p) not in taken]
            (norm if isinstance(module, nn.modules.batchnorm._NormBase) else penalised).extend(own)
        groups[name] = ParamGroup(penalised, norm)
    return groups


def nonbinary_penalty(groups: dict[str, ParamGroup], anchor: list[torch.Tensor], l2sp: float,
                      l2: float) -> torch.Tensor | float:
    """``l2sp/2 * ||w - w0||^2`` over the transferred group's penalised weights (``anchor``: their
    pretrained values, in order) plus ``l2/2 * ||w||^2`` over the re-initialised and head groups'
    (L2-SP, Li, Grandvalet & Davoine 2018; the split as in the non-binary code's ``timm/loss/l2sp.py``,
    which applies L2-SP to every transferred layer here, with one strength). BatchNorm parameters
    are in neither sum."""
    total: torch.Tensor | float = 0.0
    if l2sp:
        total = total + l2sp / 2 * sum((p - p0).pow(2).sum() for p, p0 in zip(groups["transferred"].penalised, anchor))
    if l2:
        total = total + l2 / 2 * sum(p.pow(2).sum() for name in ("head", "reinit") for p in groups[name].penalised)
    return total
