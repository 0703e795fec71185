import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrastive_lw.cudagraph import GraphedStep

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _problem(device: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    x, y = torch.rand(70, 3, 8, 8, device=device), torch.randint(0, 5, (70,), device=device)
    return model.to(device), x, y


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, graphed: bool, epochs: int = 3) -> nn.Module:
    extra = {"fused": True, "capturable": True} if x.is_cuda else {}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, **extra)
    step = GraphedStep(lambda i: F.cross_entropy(model(x[i]), y[i]), optimizer, batch_size=16, enabled=graphed)
    generator = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        # 70 = 4 full batches (graph replays) + one of 6 (eager, between replays)
        for index in torch.randperm(len(x), generator=generator).to(x.device).split(16):
            step(index)
    return model


def test_on_the_cpu_a_graphed_step_is_the_plain_step():
    model, x, y = _problem("cpu")
    plain = _train(copy.deepcopy(model), x, y, graphed=False)
    graphed = _train(model, x, y, graphed=True)
    for a, b in zip(plain.state_dict().values(), graphed.state_dict().values()):
        assert torch.equal(a, b)


@cuda
def test_graph_replays_train_like_eager_steps_with_eager_batches_between():
    torch.backends.cudnn.benchmark = False
    model, x, y = _problem("cuda")
    plain = _train(copy.deepcopy(model), x, y, graphed=False)
    graphed = _train(model, x, y, graphed=True)
    for name, a in plain.state_dict().items():
        torch.testing.assert_close(graphed.state_dict()[name], a, atol=1e-4, rtol=1e-4, msg=name)


@cuda
def test_transfer_on_cuda_uses_the_graph_and_learns():
    from contrastive_lw.data import load_dataset
    from contrastive_lw.model import ArchConfig, LayerwiseNet
    from contrastive_lw.transfer import TransferConfig, train_transfer

    train = load_dataset("sample", "train", classes="5-9")
    test = load_dataset("sample", "test", classes="5-9")
    net = LayerwiseNet(ArchConfig(widths=(32,)))
    net.set_normalization(train.images)
    config = TransferConfig(mode="finetune", epochs=3, new_widths=(32,), hidden=64)
    results = {device: train_transfer(net, train, test, config, device)[0].test_acc for device in ("cpu", "cuda")}
    assert results["cuda"] > 0.45 and abs(results["cuda"] - results["cpu"]) < 0.08, results
