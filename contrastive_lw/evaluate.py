"""Read-outs of frozen features: pooled block features, linear-probe accuracy, kNN accuracy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import LayerwiseNet


@torch.no_grad()
def block_features(net: LayerwiseNet, images: torch.Tensor, blocks: int | list[int], pool: int = 4,
                   batch_size: int = 1024) -> torch.Tensor:
    """Features N x D of uint8 ``images``: the output of each block in ``blocks`` (1-based; an int k
    means block k alone) average-pooled to ``pool`` x ``pool`` (no larger than the map), flattened
    and concatenated. Runs in eval mode on the network's device, batch by batch."""
    blocks = [blocks] if isinstance(blocks, int) else sorted(blocks)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        x = net.normalize(images[start: start + batch_size].to(device))
        parts = []
        for k, block in enumerate(net.blocks[: blocks[-1]], start=1):
            x = block(x)
            if k in blocks:
                side = min(pool, x.shape[-1])
                parts.append(F.adaptive_avg_pool2d(x, side).flatten(1).float().cpu())
        chunks.append(torch.cat(parts, dim=1))
    net.train(was_training)
    return torch.cat(chunks)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, weight_decay: float = 1e-4, max_iter: int = 200) -> float:
    """Test accuracy of a softmax regression on standardised features, fitted with L-BFGS from
    zero weights: the fit stops after ``max_iter`` iterations, short of the optimum, so a random
    start would make the accuracy depend on the random state (by ~0.1 point on the bench)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
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
