"""Figures: first-layer filter grids, what each unit of a deeper block responds to (activation
maximisation), the ideal image of each class of a classifier, tables of images, accuracy-vs-epoch
curves, the comparison bar chart, the features Head2Toe kept per layer."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .blocks import BlockNet


def filter_grid(weight: torch.Tensor, padding: int = 1) -> torch.Tensor:
    """Conv weights O x C x k x k as one image 3 x H x W in [0, 1], each filter scaled to its
    own range (C=3 shown as RGB, other C as the channel mean in grey)."""
    from torchvision.utils import make_grid

    w = weight.detach().float().cpu()
    if w.shape[1] != 3:
        w = w.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    low = w.amin(dim=(1, 2, 3), keepdim=True)
    high = w.amax(dim=(1, 2, 3), keepdim=True)
    w = (w - low) / (high - low).clamp_min(1e-8)
    rows = int(len(w) ** 0.5)
    return make_grid(w, nrow=max(1, len(w) // max(1, rows)), padding=padding, pad_value=1.0)


def save_filter_grid(weight: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Save :func:`filter_grid` of ``weight`` as a PNG (nearest-neighbour upscaled, titled)."""
    return save_filter_grids({title: weight}, path)


def save_filter_grids(weights: Mapping[str, torch.Tensor], path: str | Path, caption: str = "") -> Path:
    """Filter grids of several networks side by side, each titled by its key, ``caption`` (wrapped)
    under them."""
    fig = _figure(6 * len(weights), 6.4 + 0.5 * bool(caption))
    axes = fig.subplots(1, len(weights), squeeze=False)
    for ax, (title, weight) in zip(axes[0], weights.items()):
        ax.imshow(filter_grid(weight).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(title)
    if caption:
        fig.text(0.5, 0.01, caption, ha="center", va="bottom", wrap=True, fontsize=9)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        return _save(fig, path, tight=False)
    return _save(fig, path)


def ascend(objective: Callable[[torch.Tensor], torch.Tensor], shape: Sequence[int], steps: int = 150,
           lr: float = 0.1, decay: float = 0.5, tv: float = 0.5, jitter: int = 1, seed: int = 0) -> torch.Tensor:
    """Regularised gradient ascent on a batch of images in [0, 1] (Simonyan et al. 2013): maximise
    ``objective(images)`` (one value per image) minus ``decay`` x the squared distance to grey
    (an L2 pull that keeps what the objective does not care about flat) minus ``tv`` x the total
    variation (squared differences of neighbouring pixels: no high-frequency noise). The images are
    sigmoid-bounded and start as faint noise; each step sees them shifted by up to ``jitter``
    pixels (a random crop of images optimised with a ``jitter`` margin). Returns ``shape`` images."""
    n, channels, side = shape[0], shape[1], shape[-1]
    generator = torch.Generator().manual_seed(seed)
    logits = (0.1 * torch.randn(n, channels, side + 2 * jitter, side + 2 * jitter, generator=generator)).requires_grad_()
    optimizer = torch.optim.Adam([logits], lr=lr)
    for _ in range(steps):
        image = logits.sigmoid()
        top, left = torch.randint(0, 2 * jitter + 1, (2,), generator=generator).tolist()
        variation = (image.diff(dim=-1).square().sum() + image.diff(dim=-2).square().sum())
        loss = (-objective(image[..., top: top + side, left: left + side]).sum()
                + decay * (image - 0.5).square().sum() + tv * variation)
        logits.grad, = torch.autograd.grad(loss, logits)
        optimizer.step()
    return logits.detach().sigmoid()[..., jitter: jitter + side, jitter: jitter + side]


def maximize_activation(net: BlockNet, k: int, units: int = 64, steps: int = 150, lr: float = 0.1,
                        decay: float = 0.5, tv: float = 0.05, jitter: int = 0, seed: int = 0) -> torch.Tensor:
    """For each of the first ``units`` channels of block ``k``, the input patch (receptive-field
    size, at most 64 pixels a side; RGB in [0, 1]) that maximises that channel's mean pre-ReLU
    response (a block without ``pre_activation``, such as a torchvision stage: its output), found by
    :func:`ascend` (L2 pull to grey, total variation). No jitter by default: the patch is all the
    unit sees, and a shifted patch is another input, not the same one moved (with jitter 1 the
    block-1 patches of an untrained net excite their units less than random patches do).
    Returns units x C x P x P.

    Example:
        >>> from contrastive_lw.model import LayerwiseNet
        >>> maximize_activation(LayerwiseNet(), k=2, units=4, steps=5).shape
        torch.Size([4, 3, 13, 13])
    """
    was_training = net.training
    net.eval()
    size, units = min(net.receptive_field(k), 64), min(units, net.out_channels(k))
    channel = torch.arange(units)
    block = net.blocks[k - 1]
    map_of = getattr(block, "pre_activation", block)

    def response(patch: torch.Tensor) -> torch.Tensor:
        return map_of(net(patch, k - 1))[channel, channel].mean(dim=(1, 2))
    patches = ascend(response, (units, net.in_channels, size, size), steps, lr, decay, tv, jitter, seed)
    net.train(was_training)
    return patches


def class_images(model: nn.Module, classes: Sequence[int], size: int = 32, channels: int = 3, steps: int = 200,
                 lr: float = 0.05, decay: float = 0.05, tv: float = 0.5, jitter: int = 2, seed: int = 0) -> torch.Tensor:
    """The "ideal" image of each class in ``classes`` for a classifier of [0, 1] images (``model``,
    e.g. :func:`contrastive_lw.attack.load_transfer_model`): the input that maximises the class's
    logit under :func:`ascend`'s L2, total-variation and jitter regularisation. Returns
    len(classes) x C x size x size.

    Example:
        >>> from contrastive_lw.heads import Classifier
        >>> from contrastive_lw.model import LayerwiseNet
        >>> clf = Classifier(LayerwiseNet().prefix(1), num_classes=10, new_widths=(8,), hidden=0)
        >>> class_images(clf, [3, 5], steps=2).shape
        torch.Size([2, 3, 32, 32])
    """
    was_training = model.training
    model.eval()
    index = torch.as_tensor(list(classes))
    images = ascend(lambda x: model(x)[torch.arange(len(index)), index], (len(index), channels, size, size),
                    steps, lr, decay, tv, jitter, seed)
    model.train(was_training)
    return images


def save_class_image_grid(models: Mapping[str, nn.Module], class_names: Sequence[str], image_shape: Sequence[int],
                          path: str | Path, steps: int = 200) -> Path:
    """The :func:`class_images` of several classifiers of C x H x W images, one row each, titled by
    its key (e.g. the init it was fine-tuned from), one column per class."""
    channels, size = image_shape[0], image_shape[-1]
    rows = [list(class_images(model, range(len(class_names)), size, channels, steps)) for model in models.values()]
    return save_image_table(rows, path, [list(class_names)] * len(rows), list(models),
                            "ideal class images: the input maximising each class logit (L2, TV, jitter)")


def save_image_table(rows: Sequence[Sequence[torch.Tensor]], path: str | Path,
                     captions: Sequence[Sequence[str]] | None = None, row_titles: Sequence[str] | None = None,
                     title: str = "") -> Path:
    """A table of images (each C x H x W, float in [0, 1] or uint8), one caption under each and a
    title at the left of each row: search results, adversarial examples, ideal class images."""
    columns = max(len(row) for row in rows)
    fig = _figure(1.5 * columns + 0.6, 1.65 * len(rows) + 0.4)
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for r, row in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(row):
                ax.set_axis_off()
                continue
            image = row[c].detach().cpu()
            image = image.float() / 255 if image.dtype == torch.uint8 else image.float().clamp(0, 1)
            ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            if captions is not None and c < len(captions[r]):
                ax.set_xlabel(captions[r][c], fontsize=7)
        if row_titles is not None:
            axes[r][0].set_ylabel(row_titles[r], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def save_curves(curves: Mapping[str, Sequence[float]], path: str | Path, title: str) -> Path:
    """Test accuracy (%) against epoch, one line per entry."""
    fig = _figure(6.5, 4.2)
    ax = fig.subplots()
    for label, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), [100 * a for a in curve], marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def save_bar_chart(groups: Mapping[str, Mapping[str, tuple[float, float]]], path: str | Path, title: str) -> Path:
    """Grouped bars of mean accuracy (%) with std error bars: ``groups[x_label][series] = (mean, std)``."""
    series = sorted({name for bars in groups.values() for name in bars})
    width = 0.8 / max(1, len(series))
    fig = _figure(max(6.5, 1.3 * len(groups)), 4.5)
    ax = fig.subplots()
    for i, name in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        values = [groups[g].get(name, (float("nan"), 0.0)) for g in groups]
        ax.bar(xs, [100 * m for m, _ in values], width, yerr=[100 * s for _, s in values], capsize=3, label=name)
    ax.set_xticks(range(len(groups)), list(groups), rotation=20, ha="right")
    ax.set_ylabel("test accuracy (%)")
    finite = [100 * m for bars in groups.values() for m, _ in bars.values() if m == m]
    if finite:
        ax.set_ylim(max(0, min(finite) - 10), min(100, max(finite) + 5))
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def save_kept_features(kept: Mapping[str, Mapping[str, Sequence[int]]], path: str | Path, title: str) -> Path:
    """Bars of how many features Head2Toe kept from each layer, one bar per series at each layer:
    ``kept[series][layer] = (kept, features of the layer)``; each layer's feature count is under its name."""
    layers = list(dict.fromkeys(layer for counts in kept.values() for layer in counts))
    width = 0.8 / max(1, len(kept))
    fig = _figure(max(5.0, 1.1 * len(layers) + 1.5), 4.2)
    ax = fig.subplots()
    for i, (name, counts) in enumerate(kept.items()):
        xs = [j + (i - (len(kept) - 1) / 2) * width for j in range(len(layers))]
        ax.bar(xs, [counts[layer][0] if layer in counts else 0 for layer in layers], width, label=name)
    sizes = {layer: counts[layer][1] for counts in kept.values() for layer in counts}
    ax.set_xticks(range(len(layers)), [f"{layer}\nof {sizes[layer]}" for layer in layers], fontsize=8)
    ax.set_ylabel("features kept")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(kept) > 1:
        ax.legend()
    return _save(fig, path)


def _figure(width: float, height: float):
    """A matplotlib ``Figure`` of its own (no pyplot, no global backend switch: a notebook's
    own plots are left as they are)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _save(fig, path: str | Path, tight: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
