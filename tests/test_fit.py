import math

import pytest
import torch

from contrastive_lw.data import ImageData
from contrastive_lw.errors import ConfigError, DataError
from contrastive_lw.fit import (BlockFit, class_evidence, fit_table, format_table, head2toe_shares, logme, random_like,
                                split_train, table_rows)
from contrastive_lw.model import ArchConfig, LayerwiseNet


def _separable(n: int = 200, dim: int = 8, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features whose first ``classes`` columns say the class (plus noise), and the labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, dim, generator=g)
    x[:, :classes] += 3 * torch.nn.functional.one_hot(y, classes)
    return x, y


def test_logme_prefers_informative_features_and_true_labels():
    x, y = _separable()
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    noise = torch.randn_like(x)
    assert logme(x, y) > logme(x, shuffled)
    assert logme(x, y) > logme(noise, y)


def test_logme_evidence_is_the_gaussian_marginal_likelihood_at_its_maximum():
    """The closed form equals log N(y | 0, I/beta + F F'/alpha), and the fixed point maximises it."""
    x, labels = _separable(n=40, dim=5)
    f, y = x.double(), (labels == 0).double()
    u, s, _ = torch.linalg.svd(f, full_matrices=False)
    evidence, alpha, beta = class_evidence(u.T @ y, float(y @ y), s.pow(2), len(y), f.shape[1])

    def direct(a: float, b: float) -> float:
        cov = torch.eye(len(y), dtype=torch.float64) / b + f @ f.T / a
        return float(torch.distributions.MultivariateNormal(torch.zeros(len(y), dtype=torch.float64), cov).log_prob(y))
    assert evidence == pytest.approx(direct(alpha, beta), rel=1e-6)
    for a, b in ((alpha * 1.5, beta), (alpha / 1.5, beta), (alpha, beta * 1.5), (alpha, beta / 1.5)):
        assert direct(a, b) < evidence
    by_svd = [class_evidence(u.T @ (labels == c).double(), float((labels == c).sum()), s.pow(2), len(y), f.shape[1])[0]
              for c in range(3)]
    assert logme(x, labels) == pytest.approx(sum(by_svd) / 3 / len(y), rel=1e-6)  # N > D: the eigh path


def test_logme_handles_more_dimensions_than_samples():
    x, y = _separable(n=30, dim=50)
    f = x.double()
    u, s, _ = torch.linalg.svd(f, full_matrices=False)
    by_svd = [class_evidence(u.T @ (y == c).double(), float((y == c).sum()), s.pow(2), 30, 50)[0] for c in range(3)]
    assert logme(x, y) == pytest.approx(sum(by_svd) / 3 / 30, rel=1e-6)  # N < D: the FF' path


def test_head2toe_keeps_the_informative_block():
    x, y = _separable(n=200, dim=6, classes=2)
    informative, noise = x[:, :2], torch.randn(200, 6, generator=torch.Generator().manual_seed(3))
    shares = head2toe_shares([noise, informative], y, keep=0.25)
    assert shares[1] > shares[0]


@pytest.fixture
def target(images):
    """Two classes that differ in brightness: pretrained or not, block features separate them."""
    labels = torch.arange(len(images)) % 2
    x = images.clone()
    x[labels == 1] = (x[labels == 1].int() // 2 + 128).to(torch.uint8)
    return ImageData(x, labels, ["a", "b"])


def test_fit_table_has_a_row_per_block_and_scores_in_range(target):
    torch.manual_seed(0)
    net = LayerwiseNet(ArchConfig(widths=(4, 6)))
    train, held = split_train(target, 0.25)
    assert len(train) == 48 and len(held) == 16 and set(held.labels.tolist()) == {0, 1}
    table = fit_table(net, train, held)
    assert [r.block for r in table] == [1, 2]
    for row in table:
        assert 0 <= row.knn <= 1 and 0 <= row.linear_random <= 1 and 0 <= row.head2toe_kept <= 1
        assert math.isfinite(row.logme)
    assert {"linear_gain", "knn_gain_se"} <= set(table_rows(table)[0]) and format_table(table).count("\n") == 3
    assert all(r.held_out == 16 for r in table)


def _fit(acc: float, random: float, held_out: int) -> BlockFit:
    return BlockFit(1, knn=acc, knn_random=random, linear=acc, linear_random=random, logme=0.0, logme_random=0.0,
                    head2toe_kept=0.25, held_out=held_out)


def test_gain_se_is_the_spread_of_the_difference_of_two_measured_accuracies():
    """Two read-outs of true accuracy 0.6 and 0.5 scored on n = 400 images each: the gain measured
    over 4 000 repeats spreads by the binomial s.e. the table reports."""
    g = torch.Generator().manual_seed(0)
    n = 400
    gains = ((torch.rand(4000, n, generator=g) < 0.6).float().mean(1)
             - (torch.rand(4000, n, generator=g) < 0.5).float().mean(1))
    row = _fit(0.6, 0.5, n)
    assert row.gain_se() == pytest.approx(float(gains.std()), rel=0.05)
    assert row.gain_se() == pytest.approx(math.sqrt(0.6 * 0.4 / n + 0.5 * 0.5 / n), rel=0.01)
    assert row.gain_z() == pytest.approx(0.1 / row.gain_se())
    assert _fit(1.0, 1.0, 50).gain_se() > 0  # Laplace's estimate: never 0, even at 100%
    assert _fit(0.6, 0.5, 4 * n).gain_se() == pytest.approx(row.gain_se() / 2, rel=0.01)
    with pytest.raises(ConfigError, match="accuracy measure"):
        row.gain_se("logme")


def test_a_trained_block_beats_its_random_copy():
    """A block whose weights read out the class beats its random twin on every measure."""
    torch.manual_seed(0)
    y = torch.arange(120) % 2
    images = torch.full((120, 3, 8, 8), 100, dtype=torch.uint8)
    images[:, 0] += (60 * y)[:, None, None].to(torch.uint8)  # class 1: redder
    images[:, 1:] += torch.randint(0, 60, (120, 2, 8, 8), dtype=torch.uint8)  # noise in green and blue
    net = LayerwiseNet(ArchConfig(widths=(2,), kernel_sizes=(3,)))
    with torch.no_grad():
        net.blocks[0].conv.weight.zero_()
        net.blocks[0].conv.weight[0, 0] = 1.0  # unit 0 reads the red channel
        net.blocks[0].conv.weight[1, 0] = -1.0
    data = ImageData(images, y, ["a", "b"])
    (row,) = fit_table(net, *split_train(data, 0.5), seed=1)
    assert row.linear >= row.linear_random and row.knn >= row.knn_random
    assert row.logme > row.logme_random


def test_random_like_keeps_normalisation_and_draws_new_weights():
    net = LayerwiseNet(ArchConfig(widths=(4,)))
    net.mean.fill_(0.3)
    other = random_like(net, seed=5)
    assert torch.equal(other.mean, net.mean)
    assert not torch.equal(other.blocks[0].conv.weight, net.blocks[0].conv.weight)
    assert torch.equal(random_like(net, seed=5).blocks[0].conv.weight, other.blocks[0].conv.weight)


@pytest.mark.parametrize("labels,match", [(None, "no labels"), ("one", "two target classes")],
                         ids=["unlabelled", "one_class"])
def test_unlabelled_or_one_class_targets_are_refused(target, labels, match):
    data = ImageData(target.images, None if labels is None else torch.zeros(len(target), dtype=torch.long), ["a"])
    with pytest.raises(DataError, match=match):
        fit_table(LayerwiseNet(ArchConfig(widths=(4,))), data, data)


def test_more_blocks_than_the_backbone_is_refused(target):
    with pytest.raises(ConfigError, match="backbone has 1"):
        fit_table(LayerwiseNet(ArchConfig(widths=(4,))), target, target, blocks=2)
