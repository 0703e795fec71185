"""A training step captured once as a CUDA graph and replayed.

Small networks leave a GPU waiting on Python and kernel launches: an eager step of the paper's
transfer net (conv 256@6x6 -> conv 512@3x3 -> fc 512 -> fc 10) takes about as long for 128
images as for 512. Replaying the whole step (augmentation, forward, backward, Adam) as one graph
removes that overhead.
"""
from __future__ import annotations

from typing import Callable

import torch


class GraphedStep:
    """``step(index)``: one optimisation step on the loss ``loss_of(index)`` of the batch that
    ``index`` selects from data already on the device.

    On CUDA with ``enabled``, the first ``warmup`` full-size batches run eagerly on a side stream
    (they train as usual, and let cuDNN pick its kernels and the optimizer make its state); then
    the step is captured once and every later batch of ``batch_size`` replays the graph. Batches
    of another size (the last of an epoch), and every batch on the CPU, run eagerly. Random ops in
    ``loss_of`` (augmentation) draw fresh numbers at each replay. The optimizer must allow capture
    (Adam / AdamW with ``fused=True`` or ``capturable=True``).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = torch.optim.Adam(model.parameters())
        >>> x, y = torch.rand(10, 4), torch.randint(0, 2, (10,))
        >>> step = GraphedStep(lambda i: torch.nn.functional.cross_entropy(model(x[i]), y[i]), optimizer, 5)
        >>> step(torch.arange(5))
    """

    def __init__(self, loss_of: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
                 batch_size: int, enabled: bool = True, warmup: int = 3) -> None:
        self.loss_of, self.optimizer, self.batch_size = loss_of, optimizer, batch_size
        self.enabled, self.warmup_left = enabled, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_index: torch.Tensor | None = None

    def __call__(self, index: torch.Tensor) -> None:
        if not (self.enabled and index.is_cuda and len(index) == self.batch_size):
            self._eager(index)
        elif self.warmup_left:
            self.warmup_left -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._eager(index)
            torch.cuda.current_stream().wait_stream(side)
        else:
            if self.graph is None:
                self._capture(index)
            self.static_index.copy_(index)
            self.graph.replay()

    def _eager(self, index: torch.Tensor) -> None:
        loss = self.loss_of(index)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def _capture(self, index: torch.Tensor) -> None:
        self.static_index = index.clone()
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward makes its own gradients
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss_of(self.static_index).backward()
            self.optimizer.step()
