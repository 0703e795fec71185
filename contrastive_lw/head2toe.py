"""Head2Toe-style feature selection: a group-lasso linear probe over the features of every block
picks the columns worth keeping (Evci et al., 2022, "Head2Toe: Utilizing Intermediate
Representations for Better Transfer Learning")."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def select_features(x: torch.Tensor, y: torch.Tensor, keep: float, strength: float = 1e-3,
                    steps: int = 200, lr: float = 1e-2, seed: int = 0) -> torch.Tensor:
    """Sorted indices of the ``keep`` fraction of the columns of ``x`` (standardised features N x D)
    whose weight columns keep the largest L2 norm under a group-lasso penalty
    ``strength * sum_d ||W[:, d]||_2`` on a softmax regression fitted with Adam, its weights drawn
    from a generator of its own seeded by ``seed`` (the caller's global RNG is left as it was).

    Example:
        >>> x, y = torch.randn(64, 10), torch.randint(0, 2, (64,))
        >>> select_features(x, y, keep=0.3).shape
        torch.Size([3])
    """
    generator = torch.Generator().manual_seed(seed)
    bound = x.shape[1] ** -0.5  # nn.Linear's own init range, drawn from the local generator
    shapes = ((int(y.max()) + 1, x.shape[1]), (int(y.max()) + 1,))
    weight, bias = (torch.empty(shape).uniform_(-bound, bound, generator=generator).to(x.device).requires_grad_()
                    for shape in shapes)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(F.linear(x, weight, bias), y) + strength * weight.norm(dim=0).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    count = max(1, round(keep * x.shape[1]))
    return weight.detach().norm(dim=0).topk(count).indices.sort().values
