"""Measures of how well pretrained blocks fit a labelled target set, from one pass of features and
no fine-tuning: kNN and linear-probe accuracy against the same network with random weights
(:mod:`contrastive_lw.evaluate`), LogME (You et al., 2021) and the Head2Toe share of kept features
(:mod:`contrastive_lw.head2toe`). ``contrastive-lw advise`` turns the table into settings."""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .data import ImageData
from .errors import ConfigError, DataError
from .evaluate import block_features, knn_accuracy, linear_probe_accuracy
from .head2toe import Head2ToeConfig, normalize_layers, select_features
from .model import reset_parameters


def logme(features: torch.Tensor, labels: torch.Tensor, max_iter: int = 100, tol: float = 1e-6) -> float:
    """LogME: the log maximum evidence per sample of a Bayesian linear model from ``features``
    (N x D) to the one-hot ``labels``, averaged over classes (You, Liu, Wang & Long, 2021, "LogME:
    Practical Assessment of Pre-trained Models for Transfer Learning", ICML; Algorithm 1).

    Per class c, with target y = 1[label == c], prior w ~ N(0, 1/alpha) and noise N(0, 1/beta), the
    evidence is maximised by the paper's fixed-point iteration
    ``gamma = sum_i beta s_i / (alpha + beta s_i)``, ``alpha = gamma / m'm``,
    ``beta = (N - gamma) / ||F m - y||^2`` with ``m = beta A^-1 F'y``, ``A = alpha I + beta F'F``
    and s_i the eigenvalues of F'F, computed once (from F'F or FF', the smaller). Returns
    ``mean_c L_c / N`` with ``L = N/2 log beta + D/2 log alpha - N/2 log 2pi - beta/2 ||Fm - y||^2
    - alpha/2 m'm - 1/2 log|A|``. Higher means the features fit the labels better.

    Example:
        >>> y = torch.arange(100) % 2
        >>> logme(torch.nn.functional.one_hot(y).float() + 0.1 * torch.randn(100, 2), y) > logme(torch.randn(100, 2), y)
        True
    """
    f = features.double()
    n, dim = f.shape
    y = torch.nn.functional.one_hot(labels).double()
    # the smaller of the eigenproblems of F'F (D x D) and FF' (N x N): cheaper than the SVD of F
    sigma, vectors = torch.linalg.eigh(f.T @ f if n > dim else f @ f.T)
    keep = sigma > sigma.max() * 1e-12
    sigma, vectors = sigma[keep], vectors[:, keep]
    z = (vectors.T @ (f.T @ y)) / sigma.sqrt()[:, None] if n > dim else vectors.T @ y  # U'y, U = F V S^-1
    evidences = [class_evidence(z[:, c], float(y[:, c].sum()), sigma, n, dim, max_iter, tol)[0]
                 for c in range(y.shape[1])]
    return sum(evidences) / len(evidences) / n


def class_evidence(z: torch.Tensor, y_norm2: float, sigma: torch.Tensor, n: int, dim: int, max_iter: int = 100,
                   tol: float = 1e-6) -> tuple[float, float, float]:
    """(log evidence L, alpha, beta) at the fixed point of :func:`logme` for one target y of ``n``
    samples, given ``z`` = U'y (U: the left singular vectors of the N x ``dim`` features F with
    non-zero squared singular values ``sigma``, the non-zero eigenvalues of F'F) and ``y_norm2`` = y'y."""
    outside = y_norm2 - float(z @ z)  # the part of y no linear map of F reaches

    def terms(alpha: float, beta: float) -> tuple[torch.Tensor, float, float]:
        shrink = alpha + beta * sigma
        m2 = float((beta ** 2 * sigma * z.pow(2) / shrink.pow(2)).sum())  # m'm
        residual = float((alpha * z / shrink).pow(2).sum()) + outside  # ||F m - y||^2
        return shrink, m2, residual

    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        shrink, m2, residual = terms(alpha, beta)
        gamma = float((beta * sigma / shrink).sum())
        new_alpha, new_beta = gamma / max(m2, 1e-12), (n - gamma) / max(residual, 1e-12)
        done = abs(new_alpha / new_beta - alpha / beta) <= tol * alpha / beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    shrink, m2, residual = terms(alpha, beta)
    log_det = float(shrink.log().sum()) + (dim - len(sigma)) * math.log(alpha)  # log|A|, A = alpha I + beta F'F
    evidence = (n / 2 * math.log(beta) + dim / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
                - beta / 2 * residual - alpha / 2 * m2 - log_det / 2)
    return evidence, alpha, beta


def head2toe_shares(blocks: list[torch.Tensor], labels: torch.Tensor, keep: float = 0.25) -> list[float]:
    """Per block, the fraction of its feature columns that Head2Toe's group-lasso selection keeps
    when it chooses ``keep`` of the columns of all ``blocks`` together (Evci et al., 2022,
    "Head2Toe: Utilizing Intermediate Representations for Better Transfer Learning";
    :func:`contrastive_lw.head2toe.select_features`, each block's features L2-normalised as
    Head2Toe's are). A block above ``keep`` is favoured."""
    sizes = {str(k): block.shape[1] for k, block in enumerate(blocks)}
    x = normalize_layers(torch.cat(blocks, dim=1), sizes.values())
    counts = select_features(x, labels, sizes, Head2ToeConfig(keep_fraction=keep)).counts()
    return [count / size for count, size in zip(counts.values(), sizes.values())]


def random_like(net: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``net`` whose parameters are drawn afresh by every sub-module's
    ``reset_parameters`` (BatchNorm statistics reset too), under ``seed``; buffers such as the input
    normalisation are kept. The baseline the fit measures compare against."""
    random = copy.deepcopy(net)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reset_parameters(random)
    return random


@dataclass
class BlockFit:
    """The fit measures of blocks 1..``block`` (features of block ``block``) on a target set."""

    block: int
    knn: float
    knn_random: float
    linear: float
    linear_random: float
    logme: float
    logme_random: float
    head2toe_kept: float
    held_out: int  # the images the kNN and linear-probe accuracies are scored on

    def gain(self, measure: str = "knn") -> float:
        """``measure`` (knn, linear or logme) of the pretrained blocks minus the random-weight network's."""
        return getattr(self, measure) - getattr(self, measure + "_random")

    def gain_se(self, measure: str = "knn") -> float:
        """Standard error of :meth:`gain` for an accuracy ``measure`` (knn or linear): the binomial
        s.e. ``sqrt(p (1 - p) / n)`` of each accuracy on the ``held_out`` images, with Laplace's
        estimate ``p = (correct + 1) / (n + 2)`` (never 0), combined as for independent samples
        (both are scored on the same images: when their errors are positively correlated, as for
        two read-outs of similar features, the paired s.e. is smaller)."""
        if measure not in ("knn", "linear"):
            raise ConfigError(f"a standard error needs an accuracy measure (knn or linear), got {measure!r}")
        n = self.held_out

        def variance(accuracy: float) -> float:
            p = (accuracy * n + 1) / (n + 2)
            return p * (1 - p) / n
        return math.sqrt(variance(getattr(self, measure)) + variance(getattr(self, measure + "_random")))

    def gain_z(self, measure: str = "knn") -> float:
        """:meth:`gain` in standard errors (:meth:`gain_se`)."""
        return self.gain(measure) / self.gain_se(measure)


def split_train(data: ImageData, fraction: float = 0.2, seed: int = 0) -> tuple[ImageData, ImageData]:
    """A stratified (fit, held-out) split of a labelled training set (scikit-learn's
    ``train_test_split``): measures and searches are scored on the held-out part, never on the test set."""
    from sklearn.model_selection import train_test_split

    check_labels(data)
    index = torch.arange(len(data))
    fit, held = train_test_split(index.numpy(), test_size=fraction, random_state=seed, stratify=data.labels.numpy())
    return data.subset(torch.from_numpy(fit)), data.subset(torch.from_numpy(held))


def check_labels(data: ImageData) -> None:
    """Raise :class:`DataError` unless ``data`` is labelled with at least two classes."""
    if data.labels is None:
        raise DataError("measuring fit needs labelled target data; this dataset has no labels")
    if len(data.labels.unique()) < 2:
        raise DataError("measuring fit needs at least two target classes; got one: pass more --classes")


def fit_table(net: nn.Module, train: ImageData, held: ImageData, blocks: int | None = None, pool: int = 4,
              keep: float = 0.25, seed: int = 0, probe_iter: int = 100) -> list[BlockFit]:
    """:class:`BlockFit` of blocks 1..k for every k up to ``blocks`` (default: all of ``net.blocks``):
    read-outs fitted on ``train`` and scored on ``held``; LogME and the Head2Toe share on ``train``.
    Features of every block come from one pass of each network (pretrained and :func:`random_like`);
    the linear probe stops after ``probe_iter`` L-BFGS iterations."""
    check_labels(train)
    depth = len(net.blocks)
    blocks = depth if blocks is None else blocks
    if not 1 <= blocks <= depth:
        raise ConfigError(f"cannot measure {blocks} block(s): the backbone has {depth}")
    measured = {}
    for name, model in (("pretrained", net), ("random", random_like(net, seed))):
        measured[name] = [_per_block(model, d.images, blocks, pool) for d in (train, held)]
    (train_x, held_x), (train_r, held_r) = measured["pretrained"], measured["random"]
    shares = head2toe_shares(train_x, train.labels, keep)
    table = []
    for k in range(blocks):
        scores = {}
        for suffix, (tr, he) in (("", (train_x[k], held_x[k])), ("_random", (train_r[k], held_r[k]))):
            scores["knn" + suffix] = knn_accuracy(tr, train.labels, he, held.labels)
            scores["linear" + suffix] = linear_probe_accuracy(tr, train.labels, he, held.labels, max_iter=probe_iter)
            scores["logme" + suffix] = logme(tr, train.labels)
        table.append(BlockFit(k + 1, head2toe_kept=shares[k], held_out=len(held), **scores))
    return table


def _per_block(net: nn.Module, images: torch.Tensor, blocks: int, pool: int) -> list[torch.Tensor]:
    """Pooled features of blocks 1..``blocks``, one tensor each, from one pass."""
    sizes = [block_features(net, images[:1], k, pool).shape[1] for k in range(1, blocks + 1)]
    return list(block_features(net, images, list(range(1, blocks + 1)), pool).split(sizes, dim=1))


def table_rows(table: list[BlockFit]) -> list[dict]:
    """The table as JSON-ready dicts (with the kNN and linear-probe gains and their standard errors)."""
    rows = []
    for row in table:
        extra = {}
        for m in ("knn", "linear"):
            extra[f"{m}_gain"], extra[f"{m}_gain_se"] = row.gain(m), row.gain_se(m)
        rows.append({**asdict(row), **extra})
    return rows


def format_table(table: list[BlockFit]) -> str:
    """A Markdown table of the measures, accuracies in %, gains with their standard errors."""
    lines = ["| block | kNN | kNN random | kNN gain (s.e.) | linear | linear random | linear gain (s.e.) | LogME "
             "| LogME random | Head2Toe kept |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        gains = {m: f"{100 * r.gain(m):+.1f} ({100 * r.gain_se(m):.1f})" for m in ("knn", "linear")}
        lines.append(f"| {r.block} | {100 * r.knn:.1f} | {100 * r.knn_random:.1f} | {gains['knn']} | "
                     f"{100 * r.linear:.1f} | {100 * r.linear_random:.1f} | {gains['linear']} | {r.logme:.3f} | "
                     f"{r.logme_random:.3f} | {100 * r.head2toe_kept:.0f}% |")
    return "\n".join(lines)
