"""Adversarial examples against transfer classifiers: FGSM and PGD (L-infinity) in [0, 1] pixel
space, with the normalisation inside the model, and the classifier of a ``transfer`` run rebuilt
from its directory.

Example:
    >>> model, test = load_transfer_model("runs/transfer-k1")            # doctest: +SKIP
    >>> x = test.images[:64].float() / 255                                # doctest: +SKIP
    >>> x_adv = pgd(model, x, test.labels[:64], eps=8 / 255)              # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

METHODS = ("fgsm", "pgd")


class FeatureClassifier(nn.Module):
    """A ``linear``-mode transfer classifier as one differentiable model: pooled block features
    (:func:`~contrastive_lw.evaluate.pool_blocks`), standardised, then the linear layer."""

    def __init__(self, backbone: nn.Module, blocks: Sequence[int], pool: int, mean: torch.Tensor,
                 std: torch.Tensor, linear: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.blocks, self.pool, self.linear = backbone, list(blocks), pool, linear
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .evaluate import pool_blocks

        return self.linear((pool_blocks(self.backbone, x, self.blocks, self.pool) - self.mean) / self.std)


def check_epsilon(eps: float) -> float:
    """``eps`` unless it is negative or not a number (a ConfigError)."""
    if not eps >= 0:
        raise ConfigError(f"epsilon must be >= 0 (a pixel budget in [0, 1], e.g. 8/255), got {eps}")
    return eps


def _input_gradient(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_()
    return torch.autograd.grad(F.cross_entropy(model(x), labels), x)[0]


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one step of ``eps`` along the sign of
    the loss gradient, clipped to [0, 1]. ``images`` are float in [0, 1]."""
    step = check_epsilon(eps) * _input_gradient(model, images, labels).sign()
    return (images + step).clamp(0, 1).detach()


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, step: float = 2 / 255,
        steps: int = 10, random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient descent on the L-infinity ball (Madry et al. 2018): from a uniform random
    point of the ball (``random_start``), ``steps`` signed-gradient steps of ``step``, each
    projected back into the ball around ``images`` and into [0, 1]."""
    check_epsilon(eps)
    if steps < 1 or step <= 0:
        raise ConfigError(f"PGD needs steps >= 1 and a step size > 0, got {steps} and {step}")
    adv = images.detach()
    if random_start:
        noise = torch.rand(images.shape, generator=generator).to(images.device)
        adv = (adv + (2 * noise - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        adv = adv + step * _input_gradient(model, adv, labels).sign()
        adv = (images + (adv - images).clamp(-eps, eps)).clamp(0, 1).detach()
    return adv


def attack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, method: str, eps: float,
           **pgd_options: Any) -> torch.Tensor:
    """``method`` (fgsm or pgd) at ``eps`` on float ``images``."""
    if method not in METHODS:
        raise ConfigError(f"attack method must be one of {list(METHODS)}, got {method!r}")
    if method == "fgsm":
        return fgsm(model, images, labels, eps)
    return pgd(model, images, labels, eps, **pgd_options)


def robustness(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epsilons: Sequence[float],
               methods: Sequence[str] = METHODS, batch_size: int = 256, seed: int = 0,
               **pgd_options: Any) -> dict[str, Any]:
    """Clean accuracy and accuracy under each method at each epsilon, of uint8 ``images``:
    ``{"clean": a, "fgsm": {eps: a, ...}, "pgd": {...}}``. The model runs in eval mode."""
    for eps in epsilons:
        check_epsilon(eps)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    correct: dict[str, Any] = {"clean": 0, **{m: dict.fromkeys(epsilons, 0) for m in methods}}
    for start in range(0, len(images), batch_size):
        x = images[start: start + batch_size].to(device).float() / 255
        y = labels[start: start + batch_size].to(device)
        with torch.no_grad():
            correct["clean"] += int((model(x).argmax(1) == y).sum())
        for method in methods:
            for eps in epsilons:
                adv = attack(model, x, y, method, eps, **({"generator": generator} if method == "pgd" else {}),
                             **(pgd_options if method == "pgd" else {}))
                with torch.no_grad():
                    correct[method][eps] += int((model(adv).argmax(1) == y).sum())
    model.train(was_training)
    n = len(images)
    return {"clean": correct["clean"] / n, **{m: {eps: c / n for eps, c in correct[m].items()} for m in methods}}


def load_transfer_model(run_dir: str | Path, device: str | torch.device = "cpu"):
    """The trained classifier of a ``contrastive-lw transfer`` run (frozen, finetune or linear
    mode) as a model of float [0, 1] images, and the run's test data. Returns (model, test data)."""
    from .checkpoint import load_checkpoint
    from .config import load_yaml
    from .data import load_dataset
    from .errors import UserError
    from .evaluate import block_features, feature_scale
    from .heads import Classifier
    from .transfer import TRANSFER_STATE, TransferConfig, load_init, transfer_backbone

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "state.pt").is_file():
        raise UserError(f"{run_dir} is not a finished `contrastive-lw transfer` run (config.yaml and state.pt)")
    saved = load_yaml(run_dir / "config.yaml")
    config, data = TransferConfig.from_dict(saved["transfer"]), saved["data"]
    if config.mode not in ("frozen", "finetune", "linear"):
        raise ConfigError(f"{run_dir} is a {config.mode} run: attacks take frozen, finetune and linear runs")
    train, test = (load_dataset(data["dataset"], split, data["data_root"], data["classes"], data["limit"])
                   for split in ("train", "test"))
    torch.manual_seed(config.seed)
    backbone = transfer_backbone(load_init(saved["init"], train.images)[1], config.layers)
    state = load_checkpoint(run_dir / "state.pt", TRANSFER_STATE)["model"]
    classes = len(train.class_names)
    if config.mode == "linear":
        blocks = list(range(1, config.layers + 1)) if config.all_blocks else [config.layers]
        linear = nn.Linear(state["weight"].shape[1], classes)
        model = FeatureClassifier(backbone, blocks, config.pool,
                                  *feature_scale(block_features(backbone, train.images, blocks, config.pool)), linear)
        linear.load_state_dict(state)
    else:
        model = Classifier(backbone, classes, config.new_widths, config.hidden, train.images.shape[-1])
        model.load_state_dict(state)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval(), test


def save_attack_grid(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                     eps: float, method: str, path: str | Path, shown: int = 8, **pgd_options: Any) -> Path:
    """Originals, perturbations (scaled from [-eps, eps] to [0, 1]) and adversarial images with
    their predictions, one column per image: first those whose correct prediction the attack
    flipped, then the others, of uint8 ``images``."""
    from .visualize import save_image_table

    device = next(model.parameters()).device
    x, y = images.to(device).float() / 255, labels.to(device)
    adv = attack(model.eval(), x, y, method, eps, **pgd_options)
    with torch.no_grad():
        clean, attacked = model(x).argmax(1), model(adv).argmax(1)
    flipped = (clean == y) & (attacked != y)
    order = torch.cat([flipped.nonzero()[:, 0], (~flipped).nonzero()[:, 0]])[:shown].tolist()
    delta = (adv - x) / (2 * eps) + 0.5 if eps > 0 else torch.full_like(x, 0.5)
    rows = [[x[i] for i in order], [delta[i] for i in order], [adv[i] for i in order]]
    captions = [[f"{class_names[y[i]]} -> {class_names[clean[i]]}" for i in order],
                [f"x{1 / (2 * eps):.0f}" if eps > 0 else "" for _ in order],
                [f"-> {class_names[attacked[i]]}" for i in order]]
    return save_image_table(rows, path, captions, ["original", "perturbation", "adversarial"],
                            f"{method.upper()}, eps {255 * eps:g}/255: {int(flipped.sum())} of {len(x)} flipped")
