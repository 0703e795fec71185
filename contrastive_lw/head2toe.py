"""Head2Toe (Evci, Dumoulin, Larochelle & Mozer, 2022, "Head2Toe: Utilizing Intermediate
Representations for Better Transfer Learning", ICML), as its official code (google-research/head2toe)
does it, on a frozen backbone (any module with ``normalize(x)`` and ``.blocks``):

1. the output of every block (with ``units``, of every residual unit inside the blocks too), read
   with ``torchvision.models.feature_extraction``, average-pooled to about ``target_size`` values
   (:func:`pool_size`), flattened and L2-normalised layer by layer (:func:`layer_features`);
2. a linear classifier fitted with the group-lasso penalty ``group_lasso * sum_i ||W[:, i]||_2``,
   one group per input feature (:func:`select_features`);
3. the ``keep_fraction`` of the features with the largest ``sum_c W[c, i]^2``, over all layers
   together, are kept; each layer's kept part is L2-normalised again (:meth:`Selection.apply`);
4. a fresh, unregularised linear head is trained on them (``transfer --mode head2toe``).

Both fits are the official learning config: Adam, ``lr`` decayed to 0 on a cosine over ``steps``
batches, Glorot-uniform weights and zero bias.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class Head2ToeConfig:
    """Head2Toe's settings; the defaults are the paper's (T = 8192, lambda = 1e-4, F = 0.1) and the
    official code's learning config (Adam, lr 0.1 with cosine decay, 500 steps).

    * ``target_size`` (T): about how many values each layer's pooled map keeps (:func:`pool_size`);
    * ``group_lasso`` (lambda): strength of ``sum_i ||W[:, i]||_2`` in the selection fit;
    * ``keep_fraction`` (F): the fraction of all layers' features kept, ``int(F * D)``;
    * ``units``: read every residual unit inside the blocks too (:func:`layer_extractor`);
    * ``lr``, ``steps``: Adam's initial learning rate and the number of batches of each fit.
    Memory: the features of every training image, N x D float32 on the CPU (D ~ T x layers).
    """

    target_size: int = 8192
    group_lasso: float = 1e-4
    keep_fraction: float = 0.1
    units: bool = False
    lr: float = 0.1
    steps: int = 500

    def __post_init__(self) -> None:
        if not 0 < self.keep_fraction <= 1:
            raise ConfigError(f"head2toe.keep_fraction must be a fraction in (0, 1], got {self.keep_fraction}")
        if self.target_size < 1 or self.steps < 1:
            raise ConfigError(f"head2toe.target_size and head2toe.steps must be positive integers, got "
                              f"{self.target_size} and {self.steps}")
        if self.group_lasso < 0 or self.lr <= 0:
            raise ConfigError(f"head2toe.group_lasso must be >= 0 and head2toe.lr > 0, got {self.group_lasso} "
                              f"and {self.lr}")


def pool_size(channels: int, width: int, target_size: int) -> int | None:
    """Kernel width (and stride) of the average pool that brings a ``channels`` x ``width`` x
    ``width`` map to about ``target_size`` values: None (a global pool) when ``channels >=
    target_size``, else ``width // floor(sqrt(target_size / channels))``. Where that is 0 (a map
    smaller than the target grid) the official code falls back to a global pool; here the kernel
    is 1 and the whole map is kept, the nearer of the two to ``target_size``.

    Example:
        >>> pool_size(64, 32, 8192), pool_size(512, 4, 8192), pool_size(8192, 4, 8192)
        (2, 1, None)
    """
    if channels >= target_size:
        return None
    return max(1, width // math.isqrt(target_size // channels))


def pool_layer(features: torch.Tensor, target_size: int) -> torch.Tensor:
    """An N x C x H x W map pooled by :func:`pool_size` (valid windows, as Keras's
    ``AveragePooling2D``) and flattened to N x D; an N x D input is returned as it is."""
    if features.dim() == 2:
        return features
    size = pool_size(features.shape[1], features.shape[-1], target_size)
    if size is None:
        return features.mean(dim=(2, 3))
    return F.avg_pool2d(features, size).flatten(1)


def normalize_layers(x: torch.Tensor, sizes: Iterable[int]) -> torch.Tensor:
    """Scale each layer's slice of the rows of ``x`` (N x sum(sizes), in column order) to unit L2
    norm, in place; an all-zero slice stays zero. Returns ``x``."""
    for part in x.split(list(sizes), dim=1):
        part.div_(part.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny))
    return x


def _is_unit(module: nn.Module) -> bool:
    """A residual unit (ResNet's BasicBlock, MobileNet's InvertedResidual): a module of modules."""
    return next(module.children(), None) is not None


def _units(block: nn.Module) -> list[tuple[int, str]]:
    """(position, child name) of the units of ``block`` whose output is not the block's own."""
    children = list(block.named_children())
    return [(j, name) for j, (name, child) in enumerate(children[:-1]) if _is_unit(child)]


def layer_extractor(blocks: nn.Sequential, units: bool = False) -> tuple[nn.Module, dict[str, str]]:
    """A module mapping normalised images to ``{node: map}`` for every block's output (and, with
    ``units``, the output of every residual unit before it), built by
    ``torchvision.models.feature_extraction.create_feature_extractor``, and the display name of
    each node (``block2``, ``block2.unit1``), in network order. Blocks without units are traced
    as single modules, so a block with data-dependent Python (``ConvBlock``) is never traced into."""
    from torchvision.models.feature_extraction import create_feature_extractor

    names: dict[str, str] = {}
    for i, block in enumerate(blocks):
        for j, child in _units(block) if units else []:
            names[f"{i}.{child}"] = f"block{i + 1}.unit{j + 1}"
        names[str(i)] = f"block{i + 1}"
    if units:
        split = {type(b) for b in blocks if _units(b)}
        leaves = {type(block[j]) for block in blocks for j, _ in _units(block)}
        leaves |= {type(b) for b in blocks if not _units(b)} - split
    else:
        leaves = {type(b) for b in blocks}
    extractor = create_feature_extractor(blocks, return_nodes=list(names),
                                         tracer_kwargs={"leaf_modules": sorted(leaves, key=str)})
    return extractor, names


@torch.no_grad()
def layer_features(net: nn.Module, images: torch.Tensor, target_size: int = 8192, units: bool = False,
                   batch_size: int = 256) -> tuple[torch.Tensor, dict[str, int]]:
    """Head2Toe's features of uint8 ``images``: every layer of :func:`layer_extractor` pooled by
    :func:`pool_layer`, L2-normalised per layer, concatenated into one float32 N x D tensor on the
    CPU (filled batch by batch: no second copy), and each layer's name -> its number of columns.
    Runs in eval mode on the network's device.

    Example:
        >>> from contrastive_lw.model import LayerwiseNet
        >>> x, sizes = layer_features(LayerwiseNet(), torch.zeros(2, 3, 32, 32, dtype=torch.uint8), 1024)
        >>> x.shape, sizes
        (torch.Size([2, 3840]), {'block1': 1024, 'block2': 512, 'block3': 2304})
    """
    extractor, names = layer_extractor(net.blocks, units)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    out, sizes = None, {}
    for start in range(0, len(images), batch_size):
        maps = extractor(net.normalize(images[start: start + batch_size].to(device)))
        parts = [pool_layer(maps[node].float(), target_size) for node in names]
        if out is None:
            sizes = {name: part.shape[1] for name, part in zip(names.values(), parts)}
            out = torch.empty(len(images), sum(sizes.values()))
        out[start: start + len(parts[0])] = torch.cat(parts, dim=1).cpu()
    net.train(was_training)
    return normalize_layers(out, sizes.values()), sizes


@dataclass
class Selection:
    """The features Head2Toe kept: sorted column ``indices`` into the concatenated layers whose
    sizes ``sizes`` (name -> columns) holds."""

    indices: torch.Tensor
    sizes: dict[str, int]

    def counts(self) -> dict[str, int]:
        """Layer name -> how many of its features were kept (the values sum to the kept total)."""
        edges = torch.tensor(list(self.sizes.values())).cumsum(0)
        per_layer = torch.bincount(torch.bucketize(self.indices.cpu(), edges, right=True), minlength=len(edges))
        return dict(zip(self.sizes, per_layer[: len(edges)].tolist()))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The kept columns of ``x``, each layer's kept part L2-normalised again (as the official
        code does after selecting)."""
        return normalize_layers(x[:, self.indices.to(x.device)], [c for c in self.counts().values() if c])


def linear_head(in_features: int, num_classes: int, generator: torch.Generator) -> nn.Linear:
    """A linear layer with Keras's Dense initialisation (Glorot-uniform weights, zero bias) drawn
    from ``generator`` (the global RNG is not used)."""
    linear = nn.utils.skip_init(nn.Linear, in_features, num_classes)
    nn.init.xavier_uniform_(linear.weight, generator=generator)
    nn.init.zeros_(linear.bias)
    return linear


def batch_order(n: int, batch_size: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """``steps`` x ``batch_size`` row indices: successive random permutations of ``range(n)``."""
    batch_size = min(batch_size, n)
    passes = math.ceil(steps * batch_size / n)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(passes)])
    return order[: steps * batch_size].view(steps, batch_size)


def train_steps(linear: nn.Linear, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                order: torch.Tensor, steps: Iterable[int], lr: float, group_lasso: float = 0.0) -> None:
    """Run the given ``steps`` of the cosine schedule (``lr`` at step 0 to 0 at ``len(order)``):
    cross-entropy on the batch ``order[step]`` plus ``group_lasso * sum_i ||W[:, i]||_2``."""
    for step in steps:
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * int(step) / len(order)))
        index = order[step].to(x.device)
        loss = F.cross_entropy(linear(x[index]), y[index])
        if group_lasso:
            loss = loss + group_lasso * linear.weight.norm(dim=0).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def select_features(x: torch.Tensor, y: torch.Tensor, sizes: dict[str, int], config: Head2ToeConfig = Head2ToeConfig(),
                    batch_size: int = 128, seed: int = 0) -> Selection:
    """Fit a linear classifier with ``config.group_lasso`` on the features ``x`` (N x D, the layers
    of ``sizes`` side by side) for ``config.steps`` batches and keep the ``config.keep_fraction`` of
    the columns (``int(F * D)``, at least 1) with the largest ``sum_c W[c, i]^2``. Its weights and
    batches come from a generator of its own seeded by ``seed``: the same call selects the same
    features, and the caller's global RNG is left as it was.

    Example:
        >>> y = torch.arange(60) % 3
        >>> x = torch.cat([torch.nn.functional.one_hot(y, 3).float(), torch.randn(60, 27)], dim=1)
        >>> select_features(x, y, {"a": 3, "b": 27}, Head2ToeConfig(keep_fraction=0.1)).counts()
        {'a': 3, 'b': 0}
    """
    generator = torch.Generator().manual_seed(seed)
    linear = linear_head(x.shape[1], int(y.max()) + 1, generator).to(x.device)
    optimizer = torch.optim.Adam(linear.parameters(), lr=config.lr)
    order = batch_order(len(x), batch_size, config.steps, generator)
    train_steps(linear, optimizer, x, y, order, range(config.steps), config.lr, config.group_lasso)
    scores = linear.weight.detach().square().sum(dim=0)
    count = max(1, int(config.keep_fraction * x.shape[1]))
    return Selection(scores.topk(count).indices.sort().values, dict(sizes))
