import dataclasses

import pytest
import torch

from contrastive_lw import load_backbone
from contrastive_lw.data import ImageData
from contrastive_lw.errors import ConfigError
from contrastive_lw.model import ArchConfig, LayerwiseNet
from contrastive_lw.supervised import train_supervised
from contrastive_lw.transfer import (ParamGroup, TransferConfig, load_init, optimizer_groups, random_crop_flip,
                                     set_epoch_lr, train_transfer)

ARCH = ArchConfig(widths=(4, 6))


@pytest.fixture
def split(images):
    labels = torch.arange(len(images)) % 2
    # make the task learnable: class 1 images are brighter
    x = images.clone()
    x[labels == 1] = (x[labels == 1].int() // 2 + 128).to(torch.uint8)
    return ImageData(x[:48], labels[:48], ["a", "b"]), ImageData(x[48:], labels[48:], ["a", "b"])


def _source():
    torch.manual_seed(0)
    return LayerwiseNet(ARCH)


def _config(**kw):
    return TransferConfig(**{**dict(layers=1, epochs=2, batch_size=16, new_widths=(8,), hidden=16), **kw})


def _one_step(mode, split, **kw):
    """Train one epoch (one batch unless ``batch_size`` says otherwise); return (source, result, model)."""
    train, test = split
    source = _source()
    result, model = train_transfer(source, train, test, _config(**{"mode": mode, "epochs": 1, "batch_size": 64, **kw}), "cpu")
    return source, result, model


def test_frozen_mode_trains_only_the_new_layers(split):
    source, result, model = _one_step("frozen", split)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.fc.parameters())
    assert torch.equal(model.backbone.blocks[0].conv.weight, source.blocks[0].conv.weight)
    assert 0 <= result.test_acc <= 1 and len(result.curve) == 1


def test_frozen_two_blocks_keep_weights_and_batchnorm_statistics_and_learn(split):
    """Frozen at layers=2: every transferred tensor (block 2's BatchNorm running statistics too)
    stays as the source's after several epochs, while the new layers learn the task."""
    source = _source()
    with torch.no_grad():  # non-default running statistics, so a drift either way shows
        source.blocks[1][1].running_mean.uniform_(-1, 1)
        source.blocks[1][1].running_var.uniform_(0.5, 2)
    result, model = train_transfer(source, *split, _config(mode="frozen", layers=2, epochs=15, lr=1e-2), "cpu")
    before, after = source.prefix(2).state_dict(), model.backbone.state_dict()
    assert before.keys() == after.keys() and any("running_mean" in name for name in after)
    assert all(torch.equal(before[name], after[name].cpu()) for name in before)
    assert result.test_acc > 0.75  # two balanced classes: chance is 0.5


def test_finetune_mode_trains_everything_and_leaves_the_source_alone(split):
    source, _, model = _one_step("finetune", split)
    before = _source().blocks[0].conv.weight
    assert not torch.equal(model.backbone.blocks[0].conv.weight, before)
    assert torch.equal(source.blocks[0].conv.weight, before)


@pytest.mark.parametrize("lr_device", [None, torch.device("cpu")])
def test_cosine_schedule_decays_every_group_from_its_own_lr(lr_device):
    """Epoch e of 4 trains at (1 + cos(pi e / 4)) / 2 of each group's lr, float or tensor."""
    config = _config(lr=0.1, layer_lr_ratio=0.5, epochs=4, lr_schedule="cosine")
    weights = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    groups = optimizer_groups({"head": ParamGroup([weights[0]], []), "transferred": ParamGroup([weights[1]], [])},
                              config, lr_device)
    optimizer = torch.optim.Adam(groups, lr=config.lr)
    for epoch, factor in enumerate([1.0, 0.5 + 0.5 ** 1.5, 0.5, 0.5 - 0.5 ** 1.5]):
        set_epoch_lr(optimizer, config, epoch)
        assert [float(g["lr"]) for g in optimizer.param_groups] == pytest.approx([0.1 * factor, 0.05 * factor])
    set_epoch_lr(optimizer, dataclasses.replace(config, lr_schedule="constant"), 3)
    assert [float(g["lr"]) for g in optimizer.param_groups] == pytest.approx([0.1, 0.05])


def test_cosine_schedule_changes_training_only_after_the_first_epoch(split):
    """One epoch of a cosine run is the constant run's (factor 1); a second (lr x 0.5) is not."""
    def weight(schedule: str, epochs: int) -> torch.Tensor:
        config = _config(mode="linear", epochs=epochs, lr=0.05, lr_schedule=schedule)
        return train_transfer(_source(), *split, config, "cpu")[1].weight

    assert torch.equal(weight("constant", 1), weight("cosine", 1))
    assert not torch.allclose(weight("constant", 2), weight("cosine", 2))
    with pytest.raises(ConfigError, match="lr_schedule"):
        _config(lr_schedule="step")


def test_l2sp_and_layer_lr_keep_finetuned_weights_closer(split):
    drift = {}
    for name, kw in {"plain": {}, "l2sp": {"l2sp": 100.0}, "lr0": {"layer_lr_ratio": 0.0}}.items():
        source, _, model = _one_step("finetune", split, batch_size=8, **kw)
        drift[name] = float((model.backbone.blocks[0].conv.weight - source.blocks[0].conv.weight).abs().sum().detach())
    assert drift["lr0"] == 0.0
    assert drift["l2sp"] < drift["plain"]


def test_linear_mode_computes_features_once(split, monkeypatch):
    from contrastive_lw import transfer

    calls = []
    real = transfer.block_features
    monkeypatch.setattr(transfer, "block_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    train, test = split
    result, linear = train_transfer(_source(), train, test, _config(mode="linear", layers=2, epochs=5), "cpu")
    assert len(calls) == 2 and len(result.curve) == 5        # train + test features, once each
    assert linear.in_features == 4 * 4 * 4 + 6 * 4 * 4   # blocks 1 and 2, each pooled to 4x4


def test_linear_probe_learns_an_easy_task(split):
    result, _ = train_transfer(_source(), *split, _config(mode="linear", epochs=30, lr=1e-2), "cpu")
    assert result.test_acc > 0.8


def test_transfer_more_layers_than_pretrained(split):
    with pytest.raises(ConfigError, match="pretrain more layers or transfer fewer"):
        train_transfer(_source().prefix(1), *split, _config(layers=2), "cpu")


def test_random_crop_flip_keeps_shape_and_content():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = random_crop_flip(x, padding=2)
    assert out.shape == x.shape
    torch.manual_seed(0)
    assert torch.equal(random_crop_flip(x, padding=0).sort(dim=3).values, x.sort(dim=3).values)


def test_supervised_baseline_saves_a_loadable_backbone(tmp_path, split):
    result = train_supervised(*split, ARCH, _config(epochs=1), tmp_path, "cpu", tensorboard=False)
    assert 0 <= result.test_acc <= 1
    net = load_backbone(tmp_path)
    assert net.num_blocks == 2
    name, loaded = load_init(tmp_path, split[0].images)
    assert name == "supervised" and loaded.num_blocks == 2
    assert load_init("random", split[0].images, ARCH)[0] == "random"


class _StopAfter(Exception):
    pass


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("mode", ["finetune", "linear"])
def test_transfer_resumes_after_a_crash_bit_for_bit(tmp_path, split, monkeypatch, mode, device):
    from contrastive_lw import transfer

    config = _config(mode=mode, epochs=3, batch_size=16)
    straight, model = train_transfer(_source(), *split, config, device, state_path=tmp_path / "a.pt")
    real_fit = transfer._fit

    def fit_that_crashes_in_epoch_two(model_, optimizer, train_epoch, evaluate, *rest):
        calls = []

        def evaluate_or_crash():
            calls.append(1)
            if len(calls) == 2:
                raise _StopAfter()
            return evaluate()
        return real_fit(model_, optimizer, train_epoch, evaluate_or_crash, *rest)
    monkeypatch.setattr(transfer, "_fit", fit_that_crashes_in_epoch_two)
    with pytest.raises(_StopAfter):
        train_transfer(_source(), *split, config, device, state_path=tmp_path / "b.pt")
    monkeypatch.setattr(transfer, "_fit", real_fit)
    resumed, model_b = train_transfer(_source(), *split, config, device, state_path=tmp_path / "b.pt")
    assert resumed.curve == straight.curve
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model_b.state_dict().values()))


def _nonbinary_model(transferred=1, reinit=1):
    from contrastive_lw.heads import Classifier
    from contrastive_lw.transfer import nonbinary_groups, transfer_backbone

    torch.manual_seed(0)
    source = LayerwiseNet(ArchConfig(widths=(4, 6, 8), batch_norm=(False, True)))
    backbone = transfer_backbone(source, transferred, reinit)
    model = Classifier(backbone, 2, (8,), 16)
    return source, backbone, model, nonbinary_groups(model, backbone.blocks, transferred, reinit)


def test_nonbinary_groups_split_head_reinit_transferred_and_batchnorm():
    source, backbone, model, groups = _nonbinary_model(transferred=1, reinit=2)
    ids = {name: {id(p) for p in g.params} for name, g in groups.items()}
    assert sum(len(v) for v in ids.values()) == len(list(model.parameters()))  # each parameter once
    assert ids["transferred"] == {id(p) for p in backbone.blocks[0].parameters()}
    assert ids["reinit"] == {id(p) for p in backbone.blocks[1:].parameters()}
    bn = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for g in groups.values() for p in g.norm} == bn and bn  # the new block's and blocks 2-3's
    assert not bn & {id(p) for g in groups.values() for p in g.penalised}
    # transferred block kept, re-initialised blocks redrawn
    assert torch.equal(backbone.blocks[0].conv.weight, source.blocks[0].conv.weight)
    assert not torch.equal(backbone.blocks[1].conv.weight, source.blocks[1].conv.weight)


def test_nonbinary_penalty_is_l2sp_on_transferred_and_l2_on_the_rest():
    from contrastive_lw.transfer import nonbinary_penalty

    _, backbone, model, groups = _nonbinary_model(transferred=1, reinit=1)
    anchor = [p.detach().clone() for p in groups["transferred"].penalised]

    def penalty(**strengths) -> float:
        with torch.no_grad():
            return float(nonbinary_penalty(groups, anchor, **strengths))
    assert penalty(l2sp=1.0, l2=0.0) == 0  # at the pretrained weights
    with torch.no_grad():
        backbone.blocks[0].conv.weight.add_(1.0)  # L2-SP sees this, L2 does not
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.add_(100.0)  # neither sees BatchNorm
    moved = backbone.blocks[0].conv.weight.numel()
    assert penalty(l2sp=2.0, l2=0.0) == pytest.approx(moved)
    others = sum(p.pow(2).sum() for name in ("head", "reinit") for p in groups[name].penalised)
    assert penalty(l2sp=0.0, l2=0.5) == pytest.approx(float(others.detach()) / 4)


def test_nonbinary_finetune_uses_three_learning_rates(split, monkeypatch):
    seen = {}
    real = torch.optim.Adam

    def spy(groups, **kw):
        seen["lrs"] = [g["lr"] for g in groups]
        return real(groups, **kw)
    monkeypatch.setattr(torch.optim, "Adam", spy)
    train, test = split
    config = _config(layers=1, reinit=1, lr=0.01, layer_lr_ratio=0.1, reinit_lr_ratio=0.5, l2=1e-3, l2sp=0.1, epochs=1)
    result, model = train_transfer(_source(), train, test, config, "cpu")
    assert seen["lrs"] == pytest.approx([0.01, 0.005, 0.001])  # head, re-initialised, transferred
    assert 0 <= result.test_acc <= 1 and model.backbone.num_blocks == 2
    frozen = dataclasses.replace(config, mode="frozen")
    train_transfer(_source(), train, test, frozen, "cpu")
    assert seen["lrs"] == pytest.approx([0.01, 0.005])  # the transferred block is frozen


def test_reinit_beyond_the_backbone_is_refused(split):
    with pytest.raises(ConfigError, match="lower --reinit"):
        train_transfer(_source(), *split, _config(layers=1, reinit=2), "cpu")


def test_transfer_state_of_another_config_is_refused(tmp_path, split):
    from contrastive_lw.errors import CheckpointError

    train_transfer(_source(), *split, _config(epochs=1), "cpu", state_path=tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="another transfer config: delete it or use a new --out"):
        train_transfer(_source(), *split, _config(epochs=1, lr=0.5), "cpu", state_path=tmp_path / "state.pt")


def test_svm_mode_is_a_transfer_read_out(split):
    _, result, model = _one_step("svm", split)
    assert 0.5 < result.test_acc <= 1 and result.curve == [result.test_acc]
    assert model.weight.shape[0] == 2  # a binary SVM's decision function as two logits
