"""Head2Toe-style feature selection: a group-lasso linear probe over the features of every block
picks the columns worth keeping (Evci et al., 2022, "Head2Toe: Utilizing Intermediate
Representations for Better Transfer Learning")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def select_features(x: torch.Tensor, y: torch.Tensor, keep: float, strength: float = 1e-3,
                    steps: int = 200, lr: float = 1e-2) -> torch.Tensor:
    """Sorted indices of the ``keep`` fraction of the columns of ``x`` (standardised features N x D)
    whose weight columns keep the largest L2 norm under a group-lasso penalty
    ``strength * sum_d ||W[:, d]||_2`` on a softmax regression fitted with Adam.

    Example:
        >>> x, y = torch.randn(64, 10), torch.randint(0, 2, (64,))
        >>> select_features(x, y, keep=0.3).shape
        torch.Size([3])
    """
    torch.manual_seed(0)
    linear = nn.Linear(x.shape[1], int(y.max()) + 1).to(x.device)
    optimizer = torch.optim.Adam(linear.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(linear(x), y) + strength * linear.weight.norm(dim=0).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    count = max(1, round(keep * x.shape[1]))
    return linear.weight.detach().norm(dim=0).topk(count).indices.sort().values
