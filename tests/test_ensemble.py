import dataclasses
import itertools
import json

import pytest
import torch

from contrastive_lw.data import ImageData
from contrastive_lw.ensemble import train_transfer_ensemble
from contrastive_lw.errors import ConfigError
from contrastive_lw.model import ArchConfig, LayerwiseNet
from contrastive_lw.config import load_yaml
from contrastive_lw.study import Study, StudyConfig, _key
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
    ("frozen", (3, 3), dict(epochs=2, lr_schedule="cosine")),                                     # one shared
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



STUDY = """
source: {dataset: sample, classes: "0-1", limit: 24}
target: {dataset: sample, classes: "2-3", limit: 24}
pretrain: {arch: {widths: [4]}, steps_per_layer: 2, batch_size: 16}
transfer: {epochs: 2, new_widths: [8], hidden: 16, batch_size: 16}
inits: [layerwise, random]
modes: [frozen, finetune, knn]
layers: [1]
seeds: [0, 1]
"""


def test_compare_with_ensembles_writes_the_records_of_separate_runs(tmp_path):
    from contrastive_lw.cli import main

    (tmp_path / "s.yaml").write_text(STUDY)
    out = tmp_path / "study"
    assert main(["compare", "--config", str(tmp_path / "s.yaml"), "--out", str(out), "--no-progress",
                 "--device", "cpu", "--ensemble", "3"]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert sorted(map(_key, records)) == sorted(itertools.product(["layerwise", "random"], ["frozen", "finetune", "knn"],
                                                                  [1], [0, 1]))
    study = Study(StudyConfig.from_dict(load_yaml(tmp_path / "s.yaml")), out, "cpu")
    data = study.load_data()
    for r in records:
        if r["mode"] != "knn":   # what a separate run of the cell gives
            net = study._init(r["init"], r["seed"], data.source, data.source_test, data.target)
            config = dataclasses.replace(study.config.transfer, mode=r["mode"], layers=r["layers"], seed=r["seed"])
            expected, _ = train_transfer(net, data.target, data.target_test, config, "cpu")
            assert r["curve"] == pytest.approx(expected.curve, abs=1e-6) and r["best_epoch"] == expected.best_epoch
    assert (out / "seed1" / "transfer" / "random-finetune-k1" / "metrics.jsonl").is_file()
    assert main(["compare", "--config", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "x"),
                 "--ensemble", "0"]) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_graphed_ensemble_learns_as_separate_runs():
    from contrastive_lw.data import load_dataset

    train = load_dataset("sample", "train", classes="5-9")
    test = load_dataset("sample", "test", classes="5-9")
    sources = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = LayerwiseNet(ArchConfig(widths=(32,)))
        net.set_normalization(train.images)
        sources.append(net)
    configs = [TransferConfig(mode="finetune", epochs=3, new_widths=(32,), hidden=64, seed=s) for s in (0, 1)]
    results, _ = train_transfer_ensemble(sources, train, test, configs, "cuda")
    for source, config, result in zip(sources, configs, results):
        separate, _ = train_transfer(source, train, test, config, "cuda")
        assert result.test_acc > 0.45 and abs(result.test_acc - separate.test_acc) < 0.05, (result, separate)
