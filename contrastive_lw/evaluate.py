"""Read-outs of frozen features: pooled block features, linear-probe, linear-SVM and kNN accuracy."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .blocks import BlockNet


def pool_blocks(net: BlockNet, images: torch.Tensor, blocks: Sequence[int], pool: int = 4) -> torch.Tensor:
    """Features N x D of one batch (uint8, or float in [0, 1]): the output of each block in
    ``blocks`` (1-based, ascending) average-pooled to ``pool`` x ``pool`` (no larger than the map),
    flattened and concatenated. Differentiable; works for any network with ``normalize`` and ``blocks``."""
    x, parts = net.normalize(images), []
    for k, block in enumerate(net.blocks[: blocks[-1]], start=1):
        x = block(x)
        if k in blocks:
            parts.append(F.adaptive_avg_pool2d(x, min(pool, x.shape[-1])).flatten(1))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def block_features(net: BlockNet, images: torch.Tensor, blocks: int | list[int], pool: int = 4,
                   batch_size: int = 1024, progress: bool | None = False) -> torch.Tensor:
    """:func:`pool_blocks` of uint8 ``images`` (an int k in ``blocks`` means block k alone) as float32
    on the CPU. Runs in eval mode on the network's device, batch by batch (a tqdm bar when
    ``progress``; None: when on a terminal)."""
    blocks = [blocks] if isinstance(blocks, int) else sorted(blocks)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    chunks = [pool_blocks(net, images[start: start + batch_size].to(device), blocks, pool).float().cpu()
              for start in tqdm(range(0, len(images), batch_size), desc="features", unit="batch",
                                disable=None if progress is None else not progress)]
    net.train(was_training)
    return torch.cat(chunks)


def feature_scale(train_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and std (at least 1e-6) of ``train_x``: what :func:`standardize` uses."""
    return train_x.mean(0), train_x.std(0).clamp_min(1e-6)


def standardize(train_x: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``train_x`` and ``others`` shifted and scaled by the per-column mean and std of ``train_x``."""
    mean, std = feature_scale(train_x)
    return tuple((x - mean) / std for x in (train_x, *others))


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, weight_decay: float = 1e-4, max_iter: int = 200) -> float:
    """Test accuracy of a softmax regression on standardised features, fitted with L-BFGS from
    zero weights: the fit stops after ``max_iter`` iterations, short of the optimum, so a random
    start would make the accuracy depend on the random state (by ~0.1 point on the bench)."""
    train_x, test_x = standardize(train_x, test_x)
    classes = int(train_y.max()) + 1
    linear = torch.nn.Linear(train_x.shape[1], classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(train_x), train_y) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss
    optimizer.step(closure)
    with torch.no_grad():
        return float((linear(test_x).argmax(1) == test_y).float().mean())


def select_weight_decay(train_x: torch.Tensor, train_y: torch.Tensor, candidates: Sequence[float],
                        held_out: float = 0.2, seed: int = 0, max_iter: int = 200) -> float:
    """The L2 weight among ``candidates`` whose :func:`linear_probe_accuracy`, fitted on the training
    features less a fixed random ``held_out`` fraction, is highest on that fraction (the first of equals):
    the probe's weight decay chosen without the test images."""
    if not candidates or not 0 < held_out < 1:
        raise ValueError("select_weight_decay needs candidates and 0 < held_out < 1")
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    cut = max(1, int(held_out * len(train_x)))
    held, fit = order[:cut], order[cut:]
    scores = [linear_probe_accuracy(train_x[fit], train_y[fit], train_x[held], train_y[held], wd, max_iter)
              for wd in candidates]
    return candidates[scores.index(max(scores))]


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = 200, temperature: float = 0.1) -> float:
    """Weighted kNN accuracy on L2-normalised features (lightly's ``knn_predict``)."""
    from lightly.utils.benchmarking import knn_predict

    bank = F.normalize(train_x, dim=1).T.contiguous()
    classes = int(train_y.max()) + 1
    correct = 0
    for start in range(0, len(test_x), 1024):
        query = F.normalize(test_x[start: start + 1024], dim=1)
        predicted = knn_predict(query, bank, train_y, classes, knn_k=min(k, bank.shape[1]), knn_t=temperature)
        correct += int((predicted[:, 0] == test_y[start: start + 1024]).sum())
    return correct / len(test_x)


SVM_CS = (1e-4, 1e-3, 1e-2)  # standardised features of ~10^3 columns: larger C fit slowly and overfit


def fit_linear_svm(train_x: torch.Tensor, train_y: torch.Tensor, cs: Sequence[float] = SVM_CS,
                   validation: float = 0.2, seed: int = 0):
    """A scikit-learn ``LinearSVC`` on (already standardised) features: each C in ``cs`` is fitted
    on a stratified ``1 - validation`` part of the training set and scored on the rest; the best
    C is refitted on all of it. Returns the fitted classifier (its C in ``.C``).

    Example:
        >>> svm = fit_linear_svm(torch.randn(100, 8), torch.arange(100) % 2)   # doctest: +SKIP
    """
    from sklearn.model_selection import train_test_split
    from sklearn.svm import LinearSVC

    x, y = train_x.float().cpu().numpy(), train_y.cpu().numpy()
    fit_x, val_x, fit_y, val_y = train_test_split(x, y, test_size=validation, random_state=seed, stratify=y)
    scores = {c: LinearSVC(C=c, random_state=seed).fit(fit_x, fit_y).score(val_x, val_y) for c in cs}
    best = max(cs, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
    return LinearSVC(C=best, random_state=seed).fit(x, y)


def svm_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 cs: Sequence[float] = SVM_CS, seed: int = 0) -> float:
    """Test accuracy of :func:`fit_linear_svm` on standardised features."""
    train_x, test_x = standardize(train_x, test_x)
    svm = fit_linear_svm(train_x, train_y, cs, seed=seed)
    return float(svm.score(test_x.float().cpu().numpy(), test_y.cpu().numpy()))
