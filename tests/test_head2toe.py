import json

import pytest
import torch
from torch import nn

from contrastive_lw.cli import main
from contrastive_lw.data import ImageData
from contrastive_lw.errors import ConfigError
from contrastive_lw.head2toe import (Head2ToeConfig, Selection, layer_extractor, layer_features, normalize_layers,
                                     pool_layer, pool_size, select_features)
from contrastive_lw.model import ArchConfig, LayerwiseNet
from contrastive_lw.transfer import TransferConfig, train_transfer


def test_pool_size_is_global_from_the_target_on_else_a_kernel_of_width_over_floor_sqrt():
    assert pool_size(8192, 4, 8192) is None and pool_size(9000, 4, 8192) is None
    assert pool_size(64, 32, 8192) == 32 // 11  # floor(sqrt(128)) = 11
    assert pool_size(128, 16, 8192) == 16 // 8
    assert pool_size(256, 8, 8192) == 8 // 5  # floor(sqrt(32)) = 5
    assert pool_size(64, 4, 8192) == 1  # W // 11 = 0: the whole map, not the official code's global pool
    x = torch.randn(2, 3, 7, 7)
    pooled = pool_layer(x, target_size=12)  # floor(sqrt(4)) = 2 -> kernel 7 // 2 = 3, valid windows: 2 x 2
    assert pooled.shape == (2, 3 * 2 * 2)
    assert torch.allclose(pooled.view(2, 3, 2, 2)[:, :, 0, 1], x[:, :, :3, 3:6].mean(dim=(2, 3)))
    assert torch.allclose(pool_layer(x, target_size=3), x.mean(dim=(2, 3)))


def test_every_layer_is_l2_normalised_on_its_own(images):
    torch.manual_seed(0)
    x, sizes = layer_features(LayerwiseNet(ArchConfig(widths=(4, 6))), images, target_size=64)
    assert list(sizes) == ["block1", "block2"] and x.shape == (len(images), sum(sizes.values()))
    for part in x.split(list(sizes.values()), dim=1):
        assert torch.allclose(part.norm(dim=1), torch.ones(len(images)), atol=1e-5)
    zero = torch.zeros(2, 5)
    zero[1, 3:] = 4.0
    assert torch.equal(normalize_layers(zero, [3, 2]), torch.tensor([[0.0] * 5, [0, 0, 0, 2 ** -0.5, 2 ** -0.5]]))


def _planted(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Three layers of 40 columns; columns 45 and 90 (layers 2 and 3) carry the label, the rest is noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 120, generator=g)
    x[:, 45] += 3 * (y == 1)
    x[:, 90] += 3 * (y == 2)
    sizes = {"a": 40, "b": 40, "c": 40}
    return normalize_layers(x, sizes.values()), y, sizes


def test_group_lasso_keeps_the_columns_that_carry_the_label_and_counts_per_layer():
    x, y, sizes = _planted()
    selection = select_features(x, y, sizes, Head2ToeConfig(keep_fraction=0.05, steps=300), batch_size=64)
    assert len(selection.indices) == int(0.05 * 120) and {45, 90} <= set(selection.indices.tolist())
    counts = selection.counts()
    assert list(counts) == ["a", "b", "c"] and sum(counts.values()) == len(selection.indices)
    assert counts["b"] >= 1 and counts["c"] >= 1


def test_the_selection_repeats_under_its_seed_and_leaves_the_global_rng_alone():
    x, y, sizes = _planted(n=64)
    config = Head2ToeConfig(keep_fraction=0.5, steps=5)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = select_features(x, y, sizes, config, seed=0).indices
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(select_features(x, y, sizes, config, seed=0).indices, first)
    assert not torch.equal(select_features(x, y, sizes, config, seed=1).indices, first)


@pytest.fixture
def split(images):
    labels = torch.arange(len(images)) % 2
    x = images.clone()
    x[labels == 1] = (x[labels == 1].int() // 2 + 128).to(torch.uint8)  # class 1 is brighter
    return ImageData(x[:48], labels[:48], ["a", "b"]), ImageData(x[48:], labels[48:], ["a", "b"])


def _source() -> LayerwiseNet:
    torch.manual_seed(0)
    return LayerwiseNet(ArchConfig(widths=(4, 6)))


def test_the_fresh_head_trains_and_tests_on_the_kept_columns_only(split, monkeypatch):
    from contrastive_lw import head2toe, transfer

    chosen = torch.tensor([1, 5, 40, 200])  # of 64 + 150 columns
    picked = []

    def select(x, y, sizes, config, batch_size, seed):
        picked.append(Selection(chosen, sizes))
        return picked[-1]
    monkeypatch.setattr(head2toe, "select_features", select)
    seen = []
    real = nn.Linear.forward
    monkeypatch.setattr(transfer.nn.Linear, "forward", lambda self, x: seen.append(x.detach().clone()) or real(self, x))
    train, test = split
    config = TransferConfig(mode="head2toe", layers=2, epochs=2, batch_size=16,
                            head2toe=Head2ToeConfig(target_size=64, steps=10))
    result, linear = train_transfer(_source(), train, test, config, "cpu")
    assert linear.in_features == len(chosen) and len(result.curve) == 2
    test_x, sizes = layer_features(_source().prefix(2), test.images, 64)
    assert torch.allclose(seen[-1], picked[0].apply(test_x), atol=1e-6)  # the last call is the test evaluation
    assert all(x.shape[1] == len(chosen) for x in seen)
    assert result.head2toe_kept == {name: [count, sizes[name]] for name, count in picked[0].counts().items()}
    assert sum(kept for kept, _ in result.head2toe_kept.values()) == len(chosen)


def test_head2toe_mode_learns_the_brighter_class_and_resumes(split, tmp_path):
    train, test = split
    config = TransferConfig(mode="head2toe", layers=2, epochs=3, batch_size=16,
                            head2toe=Head2ToeConfig(target_size=64, keep_fraction=0.2, steps=60))
    result, linear = train_transfer(_source(), train, test, config, "cpu", state_path=tmp_path / "s.pt")
    total = sum(size for _, size in result.head2toe_kept.values())
    assert linear.in_features == int(0.2 * total) == sum(kept for kept, _ in result.head2toe_kept.values())
    assert result.test_acc > 0.75  # two balanced classes: chance is 0.5
    again, _ = train_transfer(_source(), train, test, config, "cpu", state_path=tmp_path / "s.pt")
    assert again.curve == result.curve and again.head2toe_kept == result.head2toe_kept


class _Stages(nn.Module):
    """A torchvision ResNet-18 as the project's backbone interface: ``normalize`` and ``blocks``."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None)
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.blocks = nn.Sequential(stem, net.layer1, net.layer2, net.layer3, net.layer4)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255


def test_residual_units_of_a_torchvision_resnet_are_read_by_name():
    torch.manual_seed(0)
    net = _Stages().eval()
    extractor, names = layer_extractor(net.blocks, units=True)
    assert list(names.values()) == ["block1", "block2.unit1", "block2", "block3.unit1", "block3",
                                    "block4.unit1", "block4", "block5.unit1", "block5"]
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        maps = extractor(net.normalize(images))
        stem = net.blocks[0](net.normalize(images))
        assert torch.allclose(maps["1.0"], net.blocks[1][0](stem), atol=1e-6)
        assert torch.allclose(maps["4"], net.blocks(net.normalize(images)), atol=1e-6)
    x, sizes = layer_features(net, images, target_size=1024, units=True)
    # 64 x 16 x 16 -> kernel 16 // 4 = 4; 512 x 2 x 2 -> kernel max(1, 2 // 1) = 2: one value a channel
    assert sizes["block1"] == 64 * 4 * 4 and sizes["block5"] == 512 and x.shape == (2, sum(sizes.values()))
    _, plain = layer_features(net, images, target_size=1024)
    assert list(plain) == ["block1", "block2", "block3", "block4", "block5"]


@pytest.fixture
def npz(write_npz):
    return write_npz(classes=2)


def _transfer(npz, out, *extra):
    return main(["transfer", "--init", "random", "--dataset", f"npz:{npz}", "--mode", "head2toe", "--layers", "2",
                 "--epochs", "2", "--batch-size", "16", "--device", "cpu", "--out", str(out), *extra])


def test_transfer_command_reports_and_draws_the_features_kept_per_layer(npz, tmp_path, capsys):
    assert _transfer(npz, tmp_path / "run", "--h2t-target", "64", "--h2t-keep", "0.25", "--h2t-lambda", "1e-3") == 0
    record = json.loads((tmp_path / "run" / "results.json").read_text())["records"][0]
    assert list(record["head2toe_kept"]) == ["block1", "block2"]
    assert "head2toe kept block1" in capsys.readouterr().out
    assert (tmp_path / "run" / "figures" / "head2toe_kept.png").stat().st_size > 0


@pytest.mark.parametrize("flags, message", [(("--h2t-keep", "0"), "keep_fraction"), (("--h2t-keep", "1.5"), "keep_fraction"),
                                            (("--h2t-target", "0"), "target_size"), (("--h2t-lambda", "-1"), "group_lasso")])
def test_bad_head2toe_settings_are_one_line_and_exit_2(npz, tmp_path, capsys, flags, message):
    assert _transfer(npz, tmp_path / "run", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("contrastive-lw") and message in err and len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match=message):
        TransferConfig.from_dict({"head2toe": {message: -1}})


def test_the_compare_report_draws_the_features_head2toe_kept(tmp_path):
    from contrastive_lw.study import write_figures

    kept = {"block1": [3, 40], "block2": [1, 20]}  # a record as train_transfer writes it
    records = [{"init": init, "mode": "head2toe", "layers": 2, "seed": 0, "test_acc": 0.5, "curve": [0.5],
                "best_epoch": 1, "seconds": 1.0, "head2toe_kept": kept} for init in ("random", "layerwise")]
    assert tmp_path / "figures" / "head2toe_kept.png" in write_figures(tmp_path, records)
