"""Figures: first-layer filter grids."""
from __future__ import annotations

from pathlib import Path

import torch


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = filter_grid(weight).permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[0] / grid.shape[1] + 0.4))
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
