"""Contrastive losses on (anchor, positive, negative) embeddings."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .accel import kernels
from .errors import ConfigError

DISTANCES = ("cosine", "sqeuclidean")
MINING = ("none", "hardest", "semihard", "all")
LOSSES = ("triplet", "infonce")


@dataclass(frozen=True)
class LossConfig:
    """``name``: ``infonce`` (the default: in-batch softmax over patches: each anchor's positive is
    its class, every other patch of the batch a negative; :func:`nt_xent`, lightly's ``NTXentLoss``
    across processes) or ``triplet`` (the paper's margin loss on a distance, optional in-batch
    negative mining; ``margin``, ``distance``, ``mining`` and ``soft_margin`` apply to it alone)."""

    name: str = "infonce"
    margin: float = 0.5
    distance: str = "cosine"
    mining: str = "none"
    soft_margin: float = 0.0
    temperature: float = 0.1

    def __post_init__(self) -> None:
        for field, value, options in (("name", self.name, LOSSES), ("distance", self.distance, DISTANCES),
                                      ("mining", self.mining, MINING)):
            if value not in options:
                raise ConfigError(f"loss.{field} must be one of {list(options)}, got {value!r}")
        if self.margin < 0 or self.soft_margin < 0 or self.temperature <= 0:
            raise ConfigError("loss.margin and loss.soft_margin must be >= 0 and loss.temperature > 0")


def pairwise_distance(x: torch.Tensor, y: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """Distance matrix B x M between rows of ``x`` and ``y``: 1 - cos, or squared Euclidean."""
    if distance == "cosine":
        return 1 - F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
    return torch.cdist(x, y).pow(2)


def paired_distance(x: torch.Tensor, y: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """Row-wise distance between ``x[i]`` and ``y[i]``. The cosine one equals
    ``1 - F.cosine_similarity(x, y)`` in value and gradient, in half the ops (2x faster on a CPU)."""
    if distance == "cosine":
        norms = x.norm(dim=1).clamp_min(1e-8) * y.norm(dim=1).clamp_min(1e-8)
        return 1 - (x * y).sum(dim=1) / norms
    return (x - y).pow(2).sum(dim=1)


class TripletLoss(nn.Module):
    """Triplet margin loss ``mean(relu(d(a, p) - d(a, n) + margin))``.

    Args:
        margin: required gap between the negative and the positive distance.
        distance: ``cosine`` (1 - cosine similarity, the default) or ``sqeuclidean``.
        mining: ``none`` uses the given negative of each triplet; ``hardest`` / ``semihard`` pick
            each anchor's negative among all negatives and the other anchors' positives of the batch
            (semi-hard: the closest one farther than the positive, else the farthest); ``all``
            (batch-all, Hermans et al. 2017) takes the hinge against every one of those candidates
            and averages it over the triplets that still violate the margin.
        soft_margin: 0 takes the hinge ``relu(x)``; ``s > 0`` the smooth hinge ``softplus(s * x) / s``
            (Hermans et al. 2017's soft margin at ``s = 1``), whose gradient never vanishes, so satisfied
            triplets keep pulling (with ``all``, the mean is over every candidate).
        gather_distributed: mine among the candidates of every process of a distributed run.

    Example:
        >>> loss = TripletLoss(margin=0.5)
        >>> a = torch.tensor([[1.0, 0.0]]); p = a.clone(); n = torch.tensor([[0.0, 1.0]])
        >>> float(loss(a, p, n))
        0.0
    """

    uses_negatives = True

    def __init__(self, margin: float = 0.5, distance: str = "cosine", mining: str = "none",
                 soft_margin: float = 0.0, gather_distributed: bool = False) -> None:
        super().__init__()
        self.margin, self.distance, self.mining, self.soft_margin = margin, distance, mining, soft_margin
        self.gather_distributed = gather_distributed

    @property
    def compares_all_pairs(self) -> bool:
        """Whether the loss's cost is quadratic in the batch (in-batch mining)."""
        return self.mining != "none"

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        if (self.mining == "none" and self.distance == "cosine" and not self.soft_margin
                and kernels.CosineTriplet.applies(anchor, positive, negative)):
            return kernels.CosineTriplet.apply(anchor, positive, negative, self.margin)
        d_pos = paired_distance(anchor, positive, self.distance)
        if self.mining == "none":
            d_neg = paired_distance(anchor, negative, self.distance)
        elif self.mining == "all":
            hinges = self._hinge(d_pos.unsqueeze(1) - self._candidate_distances(anchor, positive, negative) + self.margin)
            return hinges.sum() / (hinges > 0).sum().clamp(min=1)  # the soft hinge is > 0 at every candidate
        else:
            d_neg = self._mine(anchor, positive, negative, d_pos)
        return self._hinge(d_pos - d_neg + self.margin).mean()

    def _hinge(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x, beta=self.soft_margin) if self.soft_margin else F.relu(x)

    def _candidate_distances(self, anchor: torch.Tensor, positive: torch.Tensor,
                             negative: torch.Tensor) -> torch.Tensor:
        """B x C distances from each anchor to every negative and positive of the batch (of every
        process when gathering), its own positive at infinity."""
        batch, offset = anchor.shape[0], 0
        if self.gather_distributed and torch.distributed.is_initialized():
            from lightly.utils.dist import gather, rank

            negative, positive = torch.cat(gather(negative)), torch.cat(gather(positive))
            offset = rank() * batch
        candidates = torch.cat([negative, positive])
        d_all = pairwise_distance(anchor, candidates, self.distance)
        rows = torch.arange(batch, device=anchor.device)
        d_all[rows, len(negative) + offset + rows] = float("inf")  # each anchor's own positive
        return d_all

    def _mine(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
              d_pos: torch.Tensor) -> torch.Tensor:
        d_all = self._candidate_distances(anchor, positive, negative)
        if self.mining == "hardest":
            return d_all.min(dim=1).values
        farther = d_all > d_pos.detach().unsqueeze(1)
        semihard = torch.where(farther, d_all, torch.full_like(d_all, float("inf"))).min(dim=1).values
        easiest = torch.where(torch.isinf(d_all), torch.full_like(d_all, -float("inf")), d_all).max(dim=1).values
        return torch.where(torch.isinf(semihard), easiest, semihard)


# Logits of unit vectors / sqrt(temperature) lie in [-1 / t, 1 / t], so exp(logit - 1 / t) >= exp(-2 / t):
# a normal float32 (>= 1.2e-38) for temperatures >= 0.025. Colder ones take the log-softmax path.
SYMMETRIC_MIN_TEMPERATURE = 0.025


def nt_xent(anchor: torch.Tensor, positive: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent (SimCLR) loss of B (anchor, positive) pairs: each of the 2B embeddings classifies
    its partner among the 2B - 1 others by cosine similarity / ``temperature``. Equal to lightly's
    ``NTXentLoss`` in value and gradient (tested), in less time: one 2B x 2B similarity matrix with a
    masked diagonal instead of gathered off-diagonal entries, and from ``temperature`` 0.025 up
    (:class:`_SymmetricNTXent`) one matmul in the backward pass."""
    z = F.normalize(torch.cat([anchor, positive]), dim=1) * temperature ** -0.5
    if temperature >= SYMMETRIC_MIN_TEMPERATURE:
        return _SymmetricNTXent.apply(z, 1 / temperature)
    logits = z @ z.t()
    logits.diagonal().fill_(float("-inf"))  # an embedding is not its own partner
    n = len(anchor)
    partner = torch.arange(2 * n, device=z.device).roll(n)
    return F.cross_entropy(logits, partner)


class _SymmetricNTXent(torch.autograd.Function):
    """NT-Xent of the 2B rows of ``z`` (row i's partner is row i +- B) from the one symmetric matrix
    E = exp(z z^T - ``shift``) with a zero diagonal, ``shift`` the largest possible logit, so E is
    in (0, 1]: loss = mean_i(log sum_j E_ij + shift - z_i . z_partner). With u = 1 / E's row sums
    the gradient is (u * (E z) + E (u * z) - 2 z_partner) / 2B = (W z - 2 z_partner) / 2B with
    W_ij = E_ij (u_i + u_j): one matmul of W with z, half the FLOPs of E with [z, u * z];
    autograd's log-softmax path takes two matmuls and more passes over the 2B x 2B matrix."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, shift: float) -> torch.Tensor:
        similar = torch.mm(z, z.t())
        sums = kernels.exp_row_sums_(similar, shift)  # one pass of a C kernel on the CPU
        if sums is None:
            similar.sub_(shift).exp_().diagonal().zero_()
            sums = similar.sum(dim=1)
        partners = z.roll(len(z) // 2, dims=0)
        ctx.save_for_backward(z, similar, sums)
        return (sums.log() + shift - (z * partners).sum(dim=1)).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        z, similar, sums = ctx.saved_tensors
        weights = sums.reciprocal()
        pair_weights = torch.mul(similar, weights.unsqueeze(1) + weights)  # W, symmetric as E
        dz = (pair_weights @ z).sub_(z.roll(len(z) // 2, dims=0), alpha=2)
        return dz.mul_(grad / len(z)), None


class InfoNCELoss(nn.Module):
    """In-batch softmax over (anchor, positive) pairs: the surrogate-class view of the paper
    (perturbed copies of one patch form a class), as :func:`nt_xent`; the explicit negatives are
    not needed, every other patch of the batch is one. With ``gather_distributed`` (several
    processes) it is lightly's ``NTXentLoss``, which gathers the candidates of every rank."""

    uses_negatives = False
    compares_all_pairs = True  # its cost is quadratic in the batch

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = False) -> None:
        super().__init__()
        self.temperature = temperature
        self.gathered: nn.Module | None = None
        if gather_distributed:
            from lightly.loss import NTXentLoss

            self.gathered = NTXentLoss(temperature=temperature, gather_distributed=True)

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None = None) -> torch.Tensor:
        if self.gathered is not None:
            return self.gathered(anchor, positive)
        return nt_xent(anchor, positive, self.temperature)


def build_loss(config: LossConfig, gather_distributed: bool = False) -> nn.Module:
    """The loss module a :class:`LossConfig` describes."""
    if config.name == "infonce":
        return InfoNCELoss(config.temperature, gather_distributed)
    return TripletLoss(config.margin, config.distance, config.mining, config.soft_margin, gather_distributed)
