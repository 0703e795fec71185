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
    ``index`` selects from data already on the device. ``step(*tensors)`` passes several inputs
    (``loss_of(*tensors)``), whose batch size is the first one's length along ``batch_dim``.

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

    def __init__(self, loss_of: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer,
                 batch_size: int, enabled: bool = True, warmup: int = 3, batch_dim: int = 0) -> None:
        self.loss_of, self.optimizer, self.batch_size = loss_of, optimizer, batch_size
        self.enabled, self.warmup_left, self.batch_dim = enabled, warmup, batch_dim
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: tuple[torch.Tensor, ...] = ()

    def __call__(self, *inputs: torch.Tensor) -> None:
        first = inputs[0]
        if not (self.enabled and first.is_cuda and first.shape[self.batch_dim] == self.batch_size):
            self._eager(*inputs)
        elif self.warmup_left:
            self.warmup_left -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._eager(*inputs)
            torch.cuda.current_stream().wait_stream(side)
        else:
            if self.graph is None:
                self._capture(*inputs)
            for static, value in zip(self.static_inputs, inputs):
                static.copy_(value)
            self.graph.replay()

    def _eager(self, *inputs: torch.Tensor) -> None:
        loss = self.loss_of(*inputs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def _capture(self, *inputs: torch.Tensor) -> None:
        self.static_inputs = tuple(x.clone() for x in inputs)
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward makes its own gradients
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss_of(*self.static_inputs).backward()
            self.optimizer.step()
