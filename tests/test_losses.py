import math

import pytest
import torch

from contrastive_lw.accel import native
from contrastive_lw.errors import ConfigError
from contrastive_lw.accel.kernels import CosineTriplet
from contrastive_lw.losses import (SYMMETRIC_MIN_TEMPERATURE, InfoNCELoss, LossConfig, TripletLoss, build_loss, nt_xent,
                                   paired_distance)


def test_cosine_triplet_values_on_hand_made_vectors():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    p = torch.tensor([[2.0, 0.0], [0.0, 1.0]])   # distances 0 and 1
    n = torch.tensor([[0.0, 3.0], [1.0, 0.0]])   # distances 1 and 0
    # relu(0 - 1 + 0.5) = 0 ; relu(1 - 0 + 0.5) = 1.5  -> mean 0.75
    assert TripletLoss(margin=0.5)(a, p, n).item() == pytest.approx(0.75)


def test_squared_euclidean_triplet():
    a, p, n = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]])
    # d(a,p) = 2, d(a,n) = 4, margin 3 -> 1
    assert TripletLoss(margin=3.0, distance="sqeuclidean")(a, p, n).item() == pytest.approx(1.0)


def test_hardest_mining_picks_the_closest_candidate():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    n = torch.tensor([[-1.0, 0.0], [0.0, -1.0]])   # far from both anchors (distance 2 or 1)
    # For anchor 0 the hardest candidate is the other anchor's positive [0, 1] (distance 1).
    loss = TripletLoss(margin=1.5, mining="hardest")(a, p, n)
    assert loss.item() == pytest.approx(0.5)      # relu(0 - 1 + 1.5)
    assert TripletLoss(margin=1.5)(a, p, n).item() == pytest.approx(0.0)


def test_semihard_prefers_negatives_farther_than_the_positive():
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[math.cos(0.5), math.sin(0.5)]])          # d_ap = 1 - cos 0.5 ~ 0.122
    n = torch.tensor([[1.0, 0.0]])                               # d = 0 < d_ap: not semi-hard
    loss = TripletLoss(margin=0.5, mining="semihard")(a, p, n)
    # only candidate is n (own positive excluded); no semi-hard one -> falls back to it
    assert loss.item() == pytest.approx(1 - math.cos(0.5) + 0.5, rel=1e-5)


def test_batch_all_mining_averages_the_violating_triplets_of_every_candidate():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = a.clone()                                   # d(a, p) = 0
    n = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # anchor 0's candidates: n0 (d 1), n1 (d 2), p1 (d 1); anchor 1's: n0 (d 0), n1 (d 1), p0 (d 1).
    # Hinges relu(0 - d + 1.5): 0.5, 0, 0.5 and 1.5, 0.5, 0.5 -> five violate, sum 3.5
    loss = TripletLoss(margin=1.5, mining="all")(a, p, n)
    assert loss.item() == pytest.approx(3.5 / 5)
    assert TripletLoss(margin=0.1, mining="all")(a, p, n).item() == pytest.approx(0.1)   # only (a1, n0)


def test_soft_margin_is_a_scaled_softplus_that_keeps_satisfied_triplets_pulling():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    p = torch.tensor([[2.0, 0.0], [0.0, 1.0]])                        # distances 0 and 1
    n = torch.tensor([[0.0, 3.0], [1.0, 0.0]], requires_grad=True)   # distances 1 and 0
    # x = d_ap - d_an + 0.5 = -0.5 and 1.5; softplus(4 x) / 4 per triplet
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(6.0))) / 8
    loss = TripletLoss(margin=0.5, soft_margin=4.0)(a, p, n)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert n.grad[0].abs().sum() > 0   # the satisfied triplet (x = -0.5) still has a gradient; the hinge's is 0
    assert TripletLoss(margin=0.5, soft_margin=1e4)(a, p, n).item() == pytest.approx(0.75, abs=1e-3)  # -> hinge


def test_soft_batch_all_averages_over_every_candidate_but_the_own_positive():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p, n = a.clone(), torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # the batch-all test's six candidate distances: x = 0 - d + 1.5
    xs = [0.5, -0.5, 0.5, 1.5, 0.5, 0.5]
    expected = sum(math.log1p(math.exp(2 * x)) / 2 for x in xs) / 6
    assert TripletLoss(margin=1.5, mining="all", soft_margin=2.0)(a, p, n).item() == pytest.approx(expected, rel=1e-6)


def test_paired_cosine_distance_matches_torch_in_value_and_gradient():
    torch.manual_seed(0)
    x, y = torch.randn(32, 16, dtype=torch.float64), torch.randn(32, 16, dtype=torch.float64)
    x[0] = 0  # a zero embedding: no NaN, like torch's eps
    ours = [t.clone().requires_grad_() for t in (x, y)]
    reference = [t.clone().requires_grad_() for t in (x, y)]
    value = paired_distance(*ours)
    expected = 1 - torch.nn.functional.cosine_similarity(*reference, dim=1)
    value.sum().backward()
    expected.sum().backward()
    assert torch.allclose(value, expected, rtol=1e-12, atol=1e-12)
    for mine, theirs in zip(ours, reference):
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-10, atol=1e-12)


def triplets_with_edge_cases(batch: int = 300, dim: int = 128) -> list[torch.Tensor]:
    """Random triplets, some past the margin (no gradient), a zero anchor and a zero negative."""
    rows = [torch.randn(batch, dim, dtype=torch.float32, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    rows[1][:100] = rows[0][:100] + 0.1 * rows[1][:100]  # close positives: d(a, p) - d(a, n) + margin < 0
    rows[0][100] = 0
    rows[2][101] = 0
    return rows


def loss_and_grads(loss: TripletLoss, rows: list[torch.Tensor], weight: float = 1.0,
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [x.clone().requires_grad_() for x in rows]
    value = loss(*leaves)
    (value * weight if weight != 1 else value).backward()
    return value.detach(), [x.grad for x in leaves]


def test_cosine_triplet_kernel_equals_the_pytorch_path_in_value_and_gradient(monkeypatch):
    if native.cosine_triplet_kernel() is None:
        pytest.skip("no C compiler here: the PyTorch path is the one in use")
    rows, loss = triplets_with_edge_cases(), TripletLoss(margin=0.5)
    assert CosineTriplet.applies(*rows)
    got, got_grads = loss_and_grads(loss, rows)
    with torch.no_grad():
        assert loss(*rows) == got  # no gradient wanted: the same value
    weighted = loss_and_grads(loss, rows, weight=-2.5)[1]  # a loss inside a sum: its gradient scaled
    monkeypatch.setattr(native, "cosine_triplet_kernel", lambda: None)
    expected, expected_grads = loss_and_grads(loss, rows)
    for g, e in zip(weighted, loss_and_grads(loss, rows, weight=-2.5)[1]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-10)
    assert (got_grads[0][:100] == 0).float().mean() > 0.5  # rows past the margin: no gradient
    assert all(torch.isfinite(g).all() for g in got_grads)  # the zero rows' too, as PyTorch's


def test_cosine_triplet_kernel_keeps_a_nan_embedding_visible():
    rows = triplets_with_edge_cases()
    rows[2][7, 3] = float("nan")
    assert torch.isnan(TripletLoss()(*rows))


@pytest.mark.parametrize("temperature", [0.01, 0.1, 0.5])  # 0.01: below SYMMETRIC_MIN_TEMPERATURE
def test_nt_xent_equals_lightly_in_value_and_gradient(temperature):
    from lightly.loss import NTXentLoss

    torch.manual_seed(0)
    a, p = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    ours_inputs = [t.clone().requires_grad_() for t in (a, p)]
    theirs_inputs = [t.clone().requires_grad_() for t in (a, p)]
    ours, theirs = nt_xent(*ours_inputs, temperature), NTXentLoss(temperature)(*theirs_inputs)
    ours.backward()
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10)
    for mine, reference in zip(ours_inputs, theirs_inputs):
        assert torch.allclose(mine.grad, reference.grad, rtol=1e-8, atol=1e-12)


def nt_xent_and_gradient(a: torch.Tensor, p: torch.Tensor, temperature: float) -> list[torch.Tensor]:
    inputs = [t.clone().requires_grad_() for t in (a, p)]
    value = nt_xent(*inputs, temperature)
    value.backward()
    return [value.detach(), *(x.grad for x in inputs)]


@pytest.mark.parametrize("temperature", [SYMMETRIC_MIN_TEMPERATURE, 0.1, 0.5])
def test_nt_xent_exp_kernel_gives_the_pytorch_paths_value_and_gradient(monkeypatch, temperature):
    if native.exp_row_sums_kernel() is None:
        pytest.skip("no C compiler here: the PyTorch path is the one in use")
    torch.manual_seed(0)
    a, p = torch.randn(300, 65), torch.randn(300, 65)  # 600 rows: vectors and a short last one
    p[:5] = -a[:5]  # opposite partners: the row's smallest exponentials, near exp(-2 / temperature)
    got = nt_xent_and_gradient(a, p, temperature)
    monkeypatch.setattr(native, "exp_row_sums_kernel", lambda: None)
    expected = nt_xent_and_gradient(a, p, temperature)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=0)
    for mine, reference in zip(got[1:], expected[1:]):  # exponentials within 3 ulp of PyTorch's
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())


def test_nt_xent_keeps_a_nan_embedding_visible():
    a, p = torch.randn(8, 4), torch.randn(8, 4)
    a[3, 1] = float("nan")
    assert torch.isnan(nt_xent(a, p))


def test_nt_xent_stays_exact_in_float32_at_its_coldest_symmetric_temperature():
    # the first anchor is opposite every other embedding, its partner too: its row of
    # exp(logit - 1 / t) is ~exp(-2 / t) throughout (at t = 0.02 its gradient is already NaN)
    torch.manual_seed(0)
    v = torch.randn(16, dtype=torch.float64)
    a, p = (-v + 1e-2 * torch.randn(8, 16, dtype=torch.float64) for _ in range(2))
    a[0] = v
    inputs32, inputs64 = [t.float().requires_grad_() for t in (a, p)], [t.clone().requires_grad_() for t in (a, p)]
    value32, value64 = (nt_xent(*inputs, SYMMETRIC_MIN_TEMPERATURE) for inputs in (inputs32, inputs64))
    value32.backward()
    value64.backward()
    assert value32.item() == pytest.approx(value64.item(), rel=1e-5)
    for mine, exact in zip(inputs32, inputs64):
        assert torch.allclose(mine.grad.double(), exact.grad, rtol=1e-3, atol=1e-4)


def test_infonce_is_lightly_ntxent_and_ignores_negatives():
    torch.manual_seed(0)
    a, p = torch.randn(8, 4), torch.randn(8, 4)
    loss = build_loss(LossConfig(name="infonce", temperature=0.1))
    assert isinstance(loss, InfoNCELoss) and not loss.uses_negatives
    assert loss(a, p).item() == pytest.approx(loss(a, p, torch.randn(8, 4)).item())
    assert loss(a, a).item() < loss(a, p).item()


@pytest.mark.parametrize("bad", [dict(name="x"), dict(distance="l1"), dict(mining="batch"), dict(margin=-1),
                                 dict(soft_margin=-1)])
def test_bad_loss_config(bad):
    with pytest.raises(ConfigError):
        LossConfig(**bad)
