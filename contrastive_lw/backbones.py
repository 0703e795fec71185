"""Choosing a backbone: the project's ``lw`` net or a torchvision network cut into blocks.

A torchvision network becomes an ordered list of blocks, the stages between resolution changes:

* ``resnet18`` / ``resnet50``: the stem (conv 7x7 /2, BatchNorm, ReLU, max-pool /2), then layer1..layer4;
* ``vgg11_bn`` / ``vgg16_bn``: the groups of ``features`` that end in a max-pool;
* ``mobilenet_v3_small``: ``features`` cut before every module that halves the resolution.

``cifar_stem`` swaps the ImageNet stem for the 3x3 stride-1 convolution SSL frameworks use on
32x32 images (ResNet: no max-pool either; MobileNet: its first convolution at stride 1; VGG
already starts with one, and is unchanged). The classifier (and the final pooling) is dropped.

Example:
    >>> net = build_backbone(BackboneConfig("resnet18", cifar_stem=True))
    >>> net.num_blocks, [net.receptive_field(k) for k in (1, 2, 3)], net.out_channels(5)
    (5, [3, 11, 25], 512)
    >>> [tuple(o.shape[1:]) for o in net.block_outputs(torch.rand(2, 3, 32, 32))][-1]
    (512, 4, 4)
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .blocks import BlockNet
from .config import from_dict, to_dict
from .errors import CheckpointError, ConfigError, WeightsError
from .model import INIT_SCALE, ArchConfig, LayerwiseNet, initial_network

TORCHVISION = ("resnet18", "resnet50", "vgg11_bn", "vgg16_bn", "mobilenet_v3_small")
BACKBONES = ("lw", *TORCHVISION)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TORCHVISION_BLOCKS = 5  # every torchvision backbone here is cut into five blocks
TORCHVISION_PREFIX = "torchvision:"  # an --init naming a torchvision network, e.g. torchvision:resnet18
CIFAR_STEM_MAX_SIDE = 64  # a 3x3 stride-1 stem keeps the input's resolution: meant for small images
_CLASSIFIER_KEYS = ("fc.", "classifier.")


@dataclass(frozen=True)
class BackboneConfig:
    """Which backbone: ``name`` (one of :data:`BACKBONES`; ``lw``'s shape is the ``arch`` config),
    ``cifar_stem`` (torchvision nets on 32x32 images), ``weights`` (``none``, ``DEFAULT``, a
    torchvision weights name such as ``IMAGENET1K_V1``, or the path of a state-dict file) and
    ``blocks``: how many of a torchvision net's blocks to build (0: all)."""

    name: str = "lw"
    cifar_stem: bool = False
    weights: str = "none"
    blocks: int = 0

    def __post_init__(self) -> None:
        if self.name not in BACKBONES:
            raise ConfigError(f"unknown backbone {self.name!r}: choose one of {', '.join(BACKBONES)}")
        if self.blocks < 0:
            raise ConfigError(f"backbone.blocks must be >= 0 (0: all), got {self.blocks}")
        if self.name == "lw" and (self.cifar_stem or self.weights != "none"):
            raise ConfigError("--cifar-stem and --weights apply to torchvision backbones, not lw")
        if self.blocks > TORCHVISION_BLOCKS:
            raise ConfigError(f"{self.name} has {TORCHVISION_BLOCKS} blocks, not {self.blocks}: ask for fewer")

    def num_blocks(self, arch: ArchConfig) -> int:
        """How many blocks the backbone built from this config (and ``arch`` for ``lw``) has."""
        return arch.num_blocks if self.name == "lw" else self.blocks or TORCHVISION_BLOCKS


class TorchvisionBackbone(BlockNet):
    """A torchvision network as a :class:`~contrastive_lw.blocks.BlockNet` (see the module's docstring
    for where the blocks are cut). With pretrained weights the input is normalised with ImageNet's
    statistics (which :meth:`set_normalization` keeps); without, with the data's, as ``lw``."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        if config.name not in TORCHVISION:
            raise ConfigError(f"{config.name!r} is not a torchvision backbone: choose one of {', '.join(TORCHVISION)}")
        stages = _stages(config.name, torchvision_model(config.name, config.weights), config.cifar_stem)
        self.blocks = nn.Sequential(*stages[: config.blocks or None])
        self.config = dataclasses.replace(config, blocks=len(self.blocks))
        self.pretrained = config.weights.lower() != "none"
        self._init_normalization(3, *((IMAGENET_MEAN, IMAGENET_STD) if self.pretrained else (0.5, 0.25)))

    @property
    def spec(self) -> dict[str, Any]:
        """Name, stem and block count: the weights themselves live in the state dict."""
        return {"name": self.config.name, "cifar_stem": self.config.cifar_stem, "blocks": self.num_blocks}

    def set_normalization(self, images: torch.Tensor) -> None:
        if not self.pretrained:
            super().set_normalization(images)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.cifar_stem and max(x.shape[-2:]) > CIFAR_STEM_MAX_SIDE:
            raise ConfigError(f"--cifar-stem is for small images (<= {CIFAR_STEM_MAX_SIDE} pixels a side), got "
                              f"{x.shape[-2]}x{x.shape[-1]}: drop --cifar-stem for these images")
        return super().normalize(x)

    def receptive_field(self, k: int | None = None) -> int:
        size, jump = 1, 1
        for layer in _main_path(self.blocks[: self._check_k(k)]):
            size += (layer.kernel - 1) * layer.dilation * jump
            jump *= layer.stride
        return size

    def stride(self, k: int | None = None) -> int:
        return math.prod(layer.stride for layer in _main_path(self.blocks[: self._check_k(k)]))

    def output_size(self, input_size: int, k: int | None = None) -> int:
        size = input_size
        for layer in _main_path(self.blocks[: self._check_k(k)]):
            span = size + 2 * layer.padding - layer.dilation * (layer.kernel - 1) - 1
            size = (-(-span // layer.stride) if layer.ceil_mode else span // layer.stride) + 1
            if size < 1:
                return 0
        return size

    def out_channels(self, k: int | None = None) -> int:
        block = self.blocks[self._check_k(k) - 1]
        off = _shortcut_modules(block)
        return [m for m in block.modules() if isinstance(m, nn.Conv2d) and m not in off][-1].out_channels

    def prefix(self, k: int) -> TorchvisionBackbone:
        net = self._share_prefix(TorchvisionBackbone.__new__(TorchvisionBackbone), k)
        net.config, net.pretrained = dataclasses.replace(self.config, blocks=k), self.pretrained
        return net


def build_backbone(config: BackboneConfig | None = None, arch: ArchConfig | None = None) -> BlockNet:
    """A freshly built backbone: ``LayerwiseNet(arch)`` for ``lw``, else the torchvision net of ``config``."""
    config = config or BackboneConfig()
    return LayerwiseNet(arch) if config.name == "lw" else TorchvisionBackbone(config)


def initial_backbone(config: BackboneConfig, arch: ArchConfig, images: torch.Tensor, seed: int,
                     init_scale: float = INIT_SCALE) -> BlockNet:
    """A freshly drawn backbone, seeded by ``seed`` and normalised on uint8 ``images``: ``lw`` as
    :func:`~contrastive_lw.model.initial_network` draws it (conv weights x ``init_scale``), a
    torchvision net as torchvision initialises it (or with its ``weights``). Layer-wise pretraining
    and the supervised baseline both start here: with the same seed, from the same weights."""
    if config.name == "lw":
        return initial_network(arch, images, seed, init_scale)
    torch.manual_seed(seed)
    net = TorchvisionBackbone(config)
    net.set_normalization(images)
    return net


def canonical_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with an ``lw`` architecture's settings filled in to today's full set (a checkpoint
    written before a setting existed describes the same network as one written after)."""
    if spec.get("name") != "lw":
        return spec
    return {**spec, "arch": to_dict(from_dict(ArchConfig, spec["arch"], "checkpoint arch"))}


def backbone_from_spec(spec: dict[str, Any]) -> BlockNet:
    """The network a :attr:`BlockNet.spec` describes, with fresh weights (load the state dict next)."""
    try:
        if spec["name"] == "lw":
            return LayerwiseNet(from_dict(ArchConfig, spec["arch"], "checkpoint arch"))
        return TorchvisionBackbone(BackboneConfig(spec["name"], spec["cifar_stem"], "none", spec["blocks"]))
    except (KeyError, TypeError):
        raise CheckpointError(f"unreadable backbone description {spec!r}: the checkpoint is damaged") from None


def torchvision_model(name: str, weights: str = "none") -> nn.Module:
    """``torchvision.models.get_model(name)`` with ``weights``: ``none``, ``DEFAULT``, an enum member's
    name (``IMAGENET1K_V1`` or ``ResNet18_Weights.IMAGENET1K_V1``) or a state-dict file (a
    classifier of another size in it is ignored). Offline, a weights file missing from the torch hub
    cache is a :class:`WeightsError` naming the file and ``$TORCH_HOME``."""
    from torchvision import models

    if weights.lower() == "none":
        return models.get_model(name, weights=None)
    if Path(weights).suffix in (".pt", ".pth") or os.sep in weights or Path(weights).exists():
        return _load_state_dict_file(models.get_model(name, weights=None), name, Path(weights))
    enum = models.get_model_weights(name)
    try:
        chosen = enum.DEFAULT if weights == "DEFAULT" else enum[weights.rsplit(".", 1)[-1]]
    except KeyError:
        raise WeightsError(f"--weights {weights}: {name} has {', '.join(w.name for w in enum)} "
                           "(or DEFAULT, none, or a state-dict file)") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(chosen.url)
    try:
        return models.get_model(name, weights=chosen)
    except OSError as err:  # urllib's URLError is an OSError: no network
        raise WeightsError(f"weights file {cached.name} is not in {cached.parent} and could not be downloaded "
                           f"({type(err).__name__}): copy it there (the folder follows $TORCH_HOME) or pass "
                           "--weights PATH") from None


def _load_state_dict_file(model: nn.Module, name: str, path: Path) -> nn.Module:
    if not path.is_file():
        raise WeightsError(f"--weights {path}: no such file (give a state-dict file, none, DEFAULT or a weights name)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many kinds on a corrupt file
        raise WeightsError(f"--weights {path}: not a readable state-dict file ({type(err).__name__})") from None
    head = {key for key in model.state_dict() if key.startswith(_CLASSIFIER_KEYS)}
    state = {key: value for key, value in state.items() if key not in head} if isinstance(state, dict) else state
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise WeightsError(f"--weights {path} does not fit {name} ({str(err).splitlines()[0][:120]})") from None
    if unexpected or set(missing) - head:
        raise WeightsError(f"--weights {path} holds weights of another architecture than {name} "
                           f"({len(set(missing) - head)} missing, {len(unexpected)} unexpected keys)")
    return model


def _stages(name: str, model: nn.Module, cifar_stem: bool) -> list[nn.Module]:
    """The blocks of a torchvision model (see the module's docstring)."""
    if name.startswith("resnet"):
        stem = (nn.Sequential(_stem_conv(3, model.conv1.out_channels), model.bn1, model.relu) if cifar_stem
                else nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool))
        return [stem, model.layer1, model.layer2, model.layer3, model.layer4]
    layers = list(model.features)
    if name.startswith("vgg"):
        ends = [i + 1 for i, layer in enumerate(layers) if isinstance(layer, nn.MaxPool2d)]
        return [nn.Sequential(*layers[start:end]) for start, end in zip([0, *ends[:-1]], ends)]
    if cifar_stem:
        layers[0][0] = _stem_conv(3, layers[0][0].out_channels)
    starts = [0] + [i for i, layer in enumerate(layers) if i and _main_path_stride(layer) > 1]
    return [nn.Sequential(*layers[start:end]) for start, end in zip(starts, [*starts[1:], len(layers)])]


def _stem_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """The CIFAR stem's 3x3 stride-1 convolution, initialised as torchvision initialises its convs."""
    conv = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


@dataclass(frozen=True)
class _Window:
    kernel: int
    stride: int
    padding: int
    dilation: int
    ceil_mode: bool


def _shortcut_modules(module: nn.Module) -> set[nn.Module]:
    """Modules off the main path: ResNet's ``downsample`` shortcuts and squeeze-excitation gates
    (their 1x1 convolutions act on a pooled vector)."""
    from torchvision.ops.misc import SqueezeExcitation

    off = set()
    for name, child in module.named_modules():
        if name.split(".")[-1] == "downsample" or isinstance(child, SqueezeExcitation):
            off.update(child.modules())
    return off


def _main_path(module: nn.Module) -> list[_Window]:
    """The sliding windows (convolutions and pools) a signal passes through in ``module``, in order,
    shortcuts and gates left out: what receptive field, stride and output side follow from."""
    off = _shortcut_modules(module)
    windows = []
    for layer in module.modules():
        if layer in off or not isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            continue
        windows.append(_Window(_first(layer.kernel_size), _first(layer.stride), _first(layer.padding),
                               _first(getattr(layer, "dilation", 1)), bool(getattr(layer, "ceil_mode", False))))
    return windows


def _first(value: int | tuple[int, ...]) -> int:
    """The height entry of a (square) window setting."""
    return value if isinstance(value, int) else value[0]


def _main_path_stride(module: nn.Module) -> int:
    return math.prod(window.stride for window in _main_path(module))
