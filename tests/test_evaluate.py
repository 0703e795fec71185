import pytest
import torch

from contrastive_lw.evaluate import block_features, knn_accuracy, linear_probe_accuracy, select_weight_decay
from contrastive_lw.model import ArchConfig, LayerwiseNet


def _separable(n=200, seed=0, gap=4.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 8, generator=g) + gap * torch.nn.functional.one_hot(y, 8).float()
    return x, y


def test_knn_and_linear_probe_on_separable_features():
    (x, y), (tx, ty) = _separable(), _separable(seed=1)
    assert knn_accuracy(x, y, tx, ty, k=10) > 0.95
    assert linear_probe_accuracy(x, y, tx, ty) > 0.95
    assert knn_accuracy(x, y[torch.randperm(len(y))], tx, ty, k=10) < 0.7


def test_select_weight_decay_picks_on_held_out_training_features():
    x, y = _separable(gap=2.0)
    assert select_weight_decay(x, y, (1e3, 1e-2)) == 1e-2 == select_weight_decay(x, y, (1e-2, 1e3))  # 1e3: chance
    assert select_weight_decay(x, y, (1e-4, 1e-3, 1e-2), seed=3) == select_weight_decay(x, y, (1e-4, 1e-3, 1e-2), seed=3)
    with pytest.raises(ValueError, match="held_out"):
        select_weight_decay(x, y, (1e-2,), held_out=1.0)


def test_select_weight_decay_scores_on_rows_it_did_not_fit(monkeypatch):
    from contrastive_lw import evaluate

    x, y = torch.arange(50.0)[:, None], torch.arange(50) % 2  # each row names itself
    calls = []
    monkeypatch.setattr(evaluate, "linear_probe_accuracy",
                        lambda fit_x, fit_y, held_x, held_y, wd, max_iter: calls.append((fit_x, held_x)) or -wd)
    assert select_weight_decay(x, y, (1e-1, 1e-3, 1e-2)) == 1e-3  # the best held-out score wins
    for fit_x, held_x in calls:
        assert len(held_x) == 10 and len(fit_x) == 40
        assert sorted(torch.cat([fit_x, held_x]).flatten().tolist()) == x.flatten().tolist()  # disjoint, all rows
    assert all(torch.equal(held_x, calls[0][1]) for _, held_x in calls)  # the same held-out rows for every candidate


def test_block_features_pool_and_concatenate():
    net = LayerwiseNet(ArchConfig(widths=(4, 6)))
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    assert block_features(net, images, 1, pool=4).shape == (5, 4 * 16)
    assert block_features(net, images, [1, 2], pool=2, batch_size=2).shape == (5, 4 * 4 + 6 * 4)
    features = block_features(net, images, 2, pool=99)   # eval mode (BatchNorm running stats) ...
    assert net.training                                   # ... and the mode is restored
    assert torch.allclose(features, net.eval()(images, 2).flatten(1))


def test_linear_probe_does_not_depend_on_the_random_state():
    """The fit stops short of the optimum; from a random start its accuracy would move with the seed."""
    g = torch.Generator().manual_seed(0)
    x, tx = torch.randn(400, 64, generator=g), torch.randn(400, 64, generator=g)
    y, ty = x[:, :3].argmax(1), tx[:, :3].argmax(1)
    x, tx = x + 2 * torch.randn(400, 64, generator=g), tx + 2 * torch.randn(400, 64, generator=g)
    accuracies = set()
    for seed in range(4):
        torch.manual_seed(seed)
        accuracies.add(linear_probe_accuracy(x, y, tx, ty, max_iter=3))
    assert len(accuracies) == 1


def test_svm_on_separable_features():
    from contrastive_lw.evaluate import fit_linear_svm, svm_accuracy

    (x, y), (tx, ty) = _separable(gap=10.0), _separable(seed=1, gap=10.0)  # margins of ~3 std
    assert svm_accuracy(x, y, tx, ty) >= 0.99
    assert fit_linear_svm(x, y, cs=(0.5,)).C == 0.5
