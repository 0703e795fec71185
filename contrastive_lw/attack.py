"""Adversarial examples against transfer classifiers: FGSM and PGD (L-infinity) in [0, 1] pixel
space, with the normalisation inside the model; the classifier of a ``transfer`` run rebuilt
from its directory, attacked on a class-balanced subset of its test images; the mean ± std over
seeds of several runs as a markdown table.

Example:
    >>> model, test = load_transfer_model("runs/transfer-k1")            # doctest: +SKIP
    >>> x = test.images[:64].float() / 255                                # doctest: +SKIP
    >>> x_adv = pgd(model, x, test.labels[:64], eps=8 / 255)              # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

if TYPE_CHECKING:
    from .data import ImageData
    from .transfer import TransferConfig

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


def attack_run(run_dir: str | Path, epsilons: Sequence[float], methods: Sequence[str] = METHODS,
               images: int = 1000, batch_size: int = 256, device: str | torch.device = "cpu",
               **pgd_options: Any) -> tuple[dict[str, Any], nn.Module, ImageData]:
    """:func:`robustness` of a transfer run's classifier on ``images`` of its test images, taken
    class-balanced (:func:`~contrastive_lw.data.balanced_limit`: a folder's first N would be one or
    two classes). Returns the table written as attack.json (accuracies keyed ``"8/255"``, the
    images per class, the run's record from its results.json), the model and the attacked images."""
    import json

    from .data import balanced_limit

    model, test = load_transfer_model(run_dir, device)
    test = balanced_limit(test, images)
    result = robustness(model, test.images, test.labels, epsilons, methods, batch_size, **pgd_options)
    counts = torch.bincount(test.labels, minlength=len(test.class_names)).tolist()
    results = Path(run_dir) / "results.json"
    record = json.loads(results.read_text())["records"][0] if results.is_file() else {}
    table = {"run": {key: record[key] for key in ("init", "mode", "layers", "seed", "test_acc") if key in record},
             "clean": result["clean"], "images": len(test), "per_class": dict(zip(test.class_names, counts)),
             "pgd_options": pgd_options,
             **{m: {f"{255 * e:g}/255": a for e, a in result[m].items()} for m in methods}}
    return table, model, test


def summarize_attacks(tables: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of :func:`attack_run` tables (run ``names``) of the
    same init, mode and depth: ``{"rows": [{"init", "mode", "layers", "seeds", "runs", "images",
    "test_acc": [mean, std], "clean": [mean, std], "fgsm": {"8/255": [mean, std]}, ...}]}``."""
    import statistics

    def mean_std(values: list[float]) -> list[float]:
        return [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0]

    groups: dict[tuple, list[tuple[str, dict]]] = {}
    for name, table in zip(names, tables):
        run = table["run"]
        groups.setdefault((run.get("init", name), run.get("mode"), run.get("layers")), []).append((name, table))
    rows = []
    for (init, mode, layers), members in groups.items():
        runs, group = [m[0] for m in members], [m[1] for m in members]
        row = {"init": init, "mode": mode, "layers": layers, "seeds": [t["run"].get("seed") for t in group],
               "runs": runs, "images": group[0]["images"], "pgd_options": group[0]["pgd_options"],
               "clean": mean_std([t["clean"] for t in group])}
        if all("test_acc" in t["run"] for t in group):
            row["test_acc"] = mean_std([t["run"]["test_acc"] for t in group])
        for method in METHODS:
            if method in group[0]:
                row[method] = {eps: mean_std([t[method][eps] for t in group]) for eps in group[0][method]}
        rows.append(row)
    return {"rows": rows}


def attack_table(summary: dict[str, Any]) -> str:
    """The markdown table of :func:`summarize_attacks`: accuracy (%) mean ± std over seeds."""
    rows = summary["rows"]
    budgets = [(m, eps) for m in METHODS if m in rows[0] for eps in rows[0][m]]

    def cell(value: list[float] | None) -> str:
        return "-" if value is None else f"{100 * value[0]:.1f} ± {100 * value[1]:.1f}"
    header = (["init", "mode, blocks", "seeds", "transfer run, all test images", f"clean, the {rows[0]['images']}"]
              + [f"{m.upper()} {eps}" for m, eps in budgets])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = [row["init"], f"{row['mode']}, {row['layers']}", ", ".join(map(str, row["seeds"])),
                  cell(row.get("test_acc")), cell(row["clean"])] + [cell(row[m].get(eps)) for m, eps in budgets]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def load_transfer_model(run_dir: str | Path, device: str | torch.device = "cpu"):
    """The trained classifier of a ``contrastive-lw transfer`` run (frozen, finetune or linear
    mode) as a model of float [0, 1] images, and the run's test data. Returns (model, test data)."""
    from .backbones import BackboneConfig
    from .checkpoint import load_checkpoint
    from .config import from_dict, load_yaml
    from .data import load_dataset
    from .errors import UserError
    from .evaluate import block_features, feature_scale
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
    backbone = from_dict(BackboneConfig, saved.get("backbone"), "backbone")  # of a random or torchvision init
    init = load_init(saved["init"], train.images, backbone=backbone)[1]
    state = load_checkpoint(run_dir / "state.pt", TRANSFER_STATE)["model"]
    classes = len(train.class_names)
    if config.mode == "linear":
        backbone = transfer_backbone(init, config.layers)
        blocks = list(range(1, config.layers + 1)) if config.all_blocks else [config.layers]
        linear = nn.Linear(state["weight"].shape[1], classes)
        model = FeatureClassifier(backbone, blocks, config.pool,
                                  *feature_scale(block_features(backbone, train.images, blocks, config.pool)), linear)
        linear.load_state_dict(state)
    else:
        model = classifier_from_state(init, config, state, classes, train.images.shape[-1])
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval(), test


def classifier_from_state(init: nn.Module, config: TransferConfig, state: dict[str, torch.Tensor],
                          num_classes: int, image_size: int) -> nn.Module:
    """The frozen or finetune classifier of ``config`` with its saved weights ``state`` (the
    ``model`` of a transfer state.pt). ``init`` (the network the run started from, or any of
    its architecture) only shapes the transferred and re-initialised blocks: every weight
    comes from ``state``."""
    from .transfer import classifier, transfer_backbone

    model = classifier(transfer_backbone(init, config.layers, config.reinit), num_classes, config, image_size)
    model.load_state_dict(state)
    return model


def save_attack_grid(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                     eps: float, method: str, path: str | Path, shown: int = 8, **pgd_options: Any) -> Path:
    """Originals, perturbations (scaled from [-eps, eps] to [0, 1]) and adversarial images with
    their predictions, one column per image: first those whose correct prediction the attack
    flipped, then the others, each taking the classes in turn, of uint8 ``images``."""
    from .visualize import save_image_table

    device = next(model.parameters()).device
    x, y = images.to(device).float() / 255, labels.to(device)
    adv = attack(model.eval(), x, y, method, eps, **pgd_options)
    with torch.no_grad():
        clean, attacked = model(x).argmax(1), model(adv).argmax(1)
    flipped = (clean == y) & (attacked != y)
    order = torch.cat([classes_in_turn(flipped.nonzero()[:, 0], y.cpu()),
                       classes_in_turn((~flipped).nonzero()[:, 0], y.cpu())])[:shown].tolist()
    delta = (adv - x) / (2 * eps) + 0.5 if eps > 0 else torch.full_like(x, 0.5)
    rows = [[x[i] for i in order], [delta[i] for i in order], [adv[i] for i in order]]
    captions = [[f"{class_names[y[i]]} -> {class_names[clean[i]]}" for i in order],
                [f"x{1 / (2 * eps):.0f}" if eps > 0 else "" for _ in order],
                [f"-> {class_names[attacked[i]]}" for i in order]]
    return save_image_table(rows, path, captions, ["original", "perturbation", "adversarial"],
                            f"{method.upper()}, eps {255 * eps:g}/255: {int(flipped.sum())} of {len(x)} flipped")


def classes_in_turn(index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``index`` (positions into ``labels``) reordered to take the classes in turn: the first of
    each class, then the second of each, ... (each class's positions in their order)."""
    index = index.cpu()
    y = labels[index]
    rank = torch.empty_like(y)
    for c in y.unique():
        mask = y == c
        rank[mask] = torch.arange(int(mask.sum()))
    return index[torch.argsort(rank * (int(labels.max()) + 1) + y, stable=True)]
