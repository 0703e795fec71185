import pytest
import torch

from contrastive_lw.data import ImageData
from contrastive_lw.ensemble import train_transfer_ensemble
from contrastive_lw.errors import ConfigError
from contrastive_lw.model import ArchConfig, LayerwiseNet
from contrastive_lw.transfer import TransferConfig, train_transfer

ARCH = ArchConfig(widths=(4, 6))   # block 2 has BatchNorm: its buffers must stay per member


@pytest.fixture
def split(images):
    labels = torch.arange(len(images)) % 3
    x = images[:, :, :16, :16].clone()
    x[labels == 1] = (x[labels == 1].int() // 2 + 128).to(torch.uint8)
    return ImageData(x[:24], labels[:24], ["a", "b", "c"]), ImageData(x[24:40], labels[24:40], ["a", "b", "c"])


def _source(seed: int) -> LayerwiseNet:
    torch.manual_seed(100 + seed)
    net = LayerwiseNet(ARCH)
    with torch.no_grad():
        net.blocks[1][1].running_mean.uniform_(-1, 1)   # members' buffers differ
        net.mean.add_(0.01 * seed)
    return net


def _config(**kw) -> TransferConfig:
    # 24 images, batch 8: 3 steps per epoch
    return TransferConfig(**{**dict(layers=2, epochs=1, batch_size=8, new_widths=(8,), hidden=16), **kw})


# Fine-tuning without new conv blocks: their BatchNorm would cancel a shift of block 2's output, so
# block 2's BatchNorm bias would get a gradient of rounding noise, which Adam's first steps amplify
# to +-lr: separate runs differ there as much as an ensemble does.
@pytest.mark.parametrize("mode, seeds, extra", [
    ("finetune", (0, 1), dict(l2sp=0.5, layer_lr_ratio=0.3, weight_decay=1e-3, new_widths=())),  # own orders
    ("frozen", (3, 3), {}),                                                                       # one shared
    ("finetune", (2, 2, 5), dict(augment=False, lr=3e-3, new_widths=())),
])
def test_an_ensemble_equals_separate_runs(split, mode, seeds, extra):
    sources = [_source(i) for i in range(len(seeds))]
    configs = [_config(mode=mode, seed=s, **extra) for s in seeds]
    results, models = train_transfer_ensemble(sources, *split, configs, "cpu")
    for source, config, result, model in zip(sources, configs, results, models):
        expected, separate = train_transfer(source, *split, config, "cpu")
        want = separate.state_dict()
        assert any("running_var" in name for name in want)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6, msg=name)
        assert result.curve == pytest.approx(expected.curve, abs=1e-6)
    if mode == "frozen":   # the transferred blocks did not move
        assert torch.equal(models[0].backbone.blocks[0].conv.weight, sources[0].blocks[0].conv.weight)


def test_two_epochs_and_a_short_last_batch_equal_separate_runs(split):
    train, test = split
    train = ImageData(train.images[:21], train.labels[:21], train.class_names)   # batches 8, 8, 5
    sources = [_source(0), _source(1)]
    configs = [_config(epochs=2, seed=0, new_widths=()), _config(epochs=2, seed=7, new_widths=())]
    results, models = train_transfer_ensemble(sources, train, test, configs, "cpu")
    for source, config, result, model in zip(sources, configs, results, models):
        expected, separate = train_transfer(source, train, test, config, "cpu")
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, separate.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)
        assert result.curve == pytest.approx(expected.curve, abs=1e-6) and len(result.curve) == 2


def test_members_must_share_config_mode_and_architecture(split):
    with pytest.raises(ConfigError, match="share one transfer config"):
        train_transfer_ensemble([_source(0)] * 2, *split, [_config(seed=0), _config(seed=1, lr=0.1)], "cpu")
    with pytest.raises(ConfigError, match="trains modes"):
        train_transfer_ensemble([_source(0)], *split, [_config(mode="linear")], "cpu")
    other = LayerwiseNet(ArchConfig(widths=(5, 6)))
    with pytest.raises(ConfigError, match="same architecture"):
        train_transfer_ensemble([_source(0), other], *split, [_config(seed=0), _config(seed=1)], "cpu")
