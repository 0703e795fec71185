"""Torchvision backbones as lists of blocks: geometry, weights, checkpoints, and every command on them."""
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
import yaml

from contrastive_lw.backbones import (BACKBONES, BackboneConfig, TorchvisionBackbone, backbone_from_spec,
                                      build_backbone)
from contrastive_lw.checkpoint import load_backbone, load_checkpoint, save_backbone
from contrastive_lw.cli import main
from contrastive_lw.errors import ConfigError, WeightsError
from contrastive_lw.model import ArchConfig


@pytest.fixture
def npz(write_npz):
    return write_npz(classes=4, channels_last=True)


@pytest.mark.parametrize("name, cifar_stem", [  # resnet50 and vgg16_bn are cut by the same code as resnet18, vgg11_bn
    ("resnet18", True), ("resnet18", False), ("mobilenet_v3_small", True), ("mobilenet_v3_small", False),
    ("vgg11_bn", False)])
def test_blocks_report_their_own_output_shapes(name, cifar_stem):
    net = build_backbone(BackboneConfig(name, cifar_stem=cifar_stem)).eval()
    outputs = net.block_outputs(torch.rand(2, 3, 32, 32))
    assert len(outputs) == net.num_blocks == 5
    for k, out in enumerate(outputs, start=1):
        assert out.shape[1:] == (net.out_channels(k), net.output_size(32, k), net.output_size(32, k))
        assert net.output_size(32, k) == -(-32 // net.stride(k))  # 'same' padding: the stride sets the side
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(net(x, 2), net.block_outputs(x)[1])


def test_the_deeper_variants_build_five_blocks():
    nets = [build_backbone(BackboneConfig(name, cifar_stem=True)) for name in ("resnet50", "vgg16_bn")]
    assert [(net.num_blocks, net.out_channels(), net.output_size(32)) for net in nets] == [(5, 2048, 4), (5, 512, 1)]


def test_resnet_stages_and_cifar_stem():
    imagenet = build_backbone(BackboneConfig("resnet18"))
    cifar = build_backbone(BackboneConfig("resnet18", cifar_stem=True))
    assert [imagenet.output_size(32, k) for k in range(1, 6)] == [8, 8, 4, 2, 1]
    assert [cifar.output_size(32, k) for k in range(1, 6)] == [32, 32, 16, 8, 4]
    assert cifar.first_conv().kernel_size == (3, 3) and cifar.first_conv().stride == (1, 1)
    assert [type(m).__name__ for m in cifar.blocks[0]] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert type(imagenet.blocks[1][0]).__name__ == "BasicBlock" and len(imagenet.blocks[0]) == 4


@pytest.mark.parametrize("k", [1, 2, 3])
def test_receptive_field_matches_the_gradient_footprint(k):
    """With positive weights and inputs every ReLU passes: the input pixels that move the centre
    unit of block k are exactly its receptive field."""
    net = build_backbone(BackboneConfig("resnet18", cifar_stem=True)).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_().add_(1e-3)
    x = torch.full((1, 3, 96, 96), 0.5, dtype=torch.float64, requires_grad=True)
    net.mean.zero_(), net.std.fill_(1)
    out = net.blocks[:k](x)
    centre = out.shape[-1] // 2
    out[0, :, centre, centre].sum().backward()
    rows = x.grad[0].abs().sum(0).sum(1).nonzero().flatten()
    assert int(rows.max() - rows.min() + 1) == net.receptive_field(k)


def test_spec_checkpoint_round_trip_and_prefix(tmp_path):
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig("mobilenet_v3_small", cifar_stem=True, blocks=3))
    net.set_normalization(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8))
    save_backbone(tmp_path / "layer2.pt", net, "greedy", trained_blocks=2)
    assert load_checkpoint(tmp_path / "layer2.pt", "contrastive-lw/backbone")["backbone_spec"] == {
        "name": "mobilenet_v3_small", "cifar_stem": True, "blocks": 3}
    loaded = load_backbone(tmp_path).eval()
    x = torch.rand(2, 3, 32, 32)
    assert loaded.num_blocks == 2 and torch.equal(loaded(x), net.eval()(x, 2))
    assert net.prefix(2).blocks[0] is net.blocks[0] and net.prefix(2).spec["blocks"] == 2
    assert backbone_from_spec({"name": "lw", "arch": {"widths": [8]}}).out_channels() == 8


def test_weights_from_a_state_dict_file_with_another_classifier(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None, num_classes=7)  # a fine-tuned net: its fc differs
    torch.save(source.state_dict(), tmp_path / "mine.pth")
    net = build_backbone(BackboneConfig("resnet18", weights=str(tmp_path / "mine.pth")))
    assert torch.equal(net.blocks[4][1].conv2.weight, source.layer4[1].conv2.weight)
    assert net.pretrained and torch.allclose(net.mean, torch.tensor([0.485, 0.456, 0.406]))
    net.set_normalization(torch.zeros(4, 3, 32, 32, dtype=torch.uint8))  # ImageNet statistics stay
    assert torch.allclose(net.mean, torch.tensor([0.485, 0.456, 0.406]))


def test_bad_weights_are_one_clear_error(tmp_path, monkeypatch):
    torch.save(torchvision.models.vgg11_bn(weights=None).state_dict(), tmp_path / "vgg.pth")
    with pytest.raises(WeightsError, match="another architecture than resnet18"):
        build_backbone(BackboneConfig("resnet18", weights=str(tmp_path / "vgg.pth")))
    with pytest.raises(WeightsError, match="no such file"):
        build_backbone(BackboneConfig("resnet18", weights=str(tmp_path / "absent.pth")))
    with pytest.raises(WeightsError, match="IMAGENET1K_V1"):
        build_backbone(BackboneConfig("resnet18", weights="IMAGENET_V9"))
    with pytest.raises(ConfigError, match="unknown backbone"):
        BackboneConfig("resnet19")
    with pytest.raises(ConfigError, match="5 blocks, not 6"):
        BackboneConfig("vgg11_bn", blocks=6)


def test_offline_default_weights_name_the_file_and_torch_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub-home"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    code = main(["transfer", "--init", "torchvision:resnet18", "--weights", "DEFAULT", "--dataset", "sample",
                 "--limit", "20", "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert code == 2 and "resnet18-" in err and str(tmp_path / "hub-home") in err and "TORCH_HOME" in err
    assert len(err.strip().splitlines()) == 1


def test_backbone_help_names_every_backbone():
    from contrastive_lw.commands.common import BACKBONE_HELP

    assert all(name in BACKBONE_HELP for name in BACKBONES)


def _pretrain(out, backbone, *extra):
    return main(["pretrain", "--backbone", backbone, "--cifar-stem", "--dataset", "sample", "--limit", "40",
                 "--batch-size", "8", "--steps-per-layer", "2", "--no-progress", "--out", str(out), *extra])


def test_greedy_resnet18_writes_every_layer_and_freezes_lower_blocks(tmp_path):
    run = tmp_path / "run"
    assert _pretrain(run, "resnet18", "--layers", "4", "--joint-fraction", "0") == 0  # greedy alone
    assert {f"layer{k}.pt" for k in range(1, 5)} <= {p.name for p in run.iterdir()}
    assert yaml.safe_load((run / "config.yaml").read_text())["pretrain"]["backbone"]["blocks"] == 4
    net = load_backbone(run)
    assert isinstance(net, TorchvisionBackbone) and net.num_blocks == 4
    x = net.normalize(torch.rand(3, 3, 32, 32))
    for block in net.blocks:
        x = block.eval()(x)
    assert x.shape == (3, 256, 8, 8)
    saved = {k: load_checkpoint(run / f"layer{k}.pt", "contrastive-lw/backbone")["backbone"] for k in (1, 2, 4)}
    for name, k in (("blocks.0.0.weight", 1), ("blocks.0.1.running_mean", 1), ("blocks.1.0.bn1.running_var", 2)):
        assert torch.equal(saved[k][name], saved[4][name]), f"{name} changed after its layer was frozen"
    assert not torch.equal(saved[1]["blocks.1.0.bn1.running_var"], saved[2]["blocks.1.0.bn1.running_var"])


def test_whole_image_views_once_the_receptive_field_covers_the_image():
    from contrastive_lw.pretrain import PretrainConfig, layer_patch

    config = PretrainConfig(backbone=BackboneConfig("resnet18", cifar_stem=True))
    net = build_backbone(config.backbone)
    assert [layer_patch(net, k, config, 32) for k in (1, 2, 3, 4)] == [
        (3, "adjacent"), (11, "exemplar"), (25, "exemplar"), (32, "exemplar")]
    lw = build_backbone(arch=ArchConfig(widths=(8, 8, 8, 8), pools=(2,)))
    with pytest.raises(ConfigError, match="larger than the 32x32 images and its output on them is empty"):
        layer_patch(lw, 4, PretrainConfig(arch=lw.arch), 32)


@pytest.mark.parametrize("name", ["vgg11_bn", "mobilenet_v3_small"])
def test_other_backbones_pretrain_and_transfer(tmp_path, name):
    run = tmp_path / "run"
    assert _pretrain(run, name, "--layers", "2") == 0
    assert load_backbone(run).num_blocks == 2
    assert main(["transfer", "--init", str(run), "--mode", "frozen", "--layers", "2", "--epochs", "1",
                 "--dataset", "sample", "--limit", "40", "--no-progress", "--out", str(tmp_path / "t")]) == 0


def test_end_to_end_resnet_trains_every_block(tmp_path):
    run = tmp_path / "run"
    assert _pretrain(run, "resnet18", "--layers", "2", "--mode", "end2end") == 0
    torch.manual_seed(0)
    fresh = build_backbone(BackboneConfig("resnet18", cifar_stem=True, blocks=2))
    trained = load_backbone(run)
    assert not torch.equal(fresh.blocks[0][0].weight, trained.blocks[0][0].weight)
    assert not torch.equal(fresh.blocks[1][0].conv1.weight, trained.blocks[1][0].conv1.weight)


def test_transfer_from_runs_and_torchvision_inits(tmp_path):
    run = tmp_path / "run"
    assert _pretrain(run, "resnet18", "--layers", "2") == 0
    common = ["--dataset", "sample", "--limit", "40", "--epochs", "1", "--no-progress"]
    assert main(["transfer", "--init", str(run), "--mode", "head2toe", "--layers", "2", *common,
                 "--out", str(tmp_path / "h2t")]) == 0
    assert main(["transfer", "--init", "torchvision:resnet18", "--weights", "none", "--mode", "frozen",
                 "--layers", "2", *common, "--out", str(tmp_path / "tv")]) == 0
    assert main(["transfer", "--init", "random", "--backbone", "resnet18", "--cifar-stem", "--mode", "finetune",
                 "--layers", "1", *common, "--out", str(tmp_path / "random")]) == 0
    assert main(["attack", str(tmp_path / "random"), "--images", "10", "--steps", "2", "--eps", "4"]) == 0
    assert (tmp_path / "random" / "attack" / "attack.json").is_file()


def test_supervised_baseline_of_a_torchvision_backbone(tmp_path):
    out = tmp_path / "sup"
    assert main(["supervised", "--backbone", "resnet18", "--cifar-stem", "--layers", "2", "--dataset", "sample",
                 "--limit", "40", "--epochs", "1", "--no-progress", "--out", str(out)]) == 0
    net = load_backbone(out)
    assert net.spec == {"name": "resnet18", "cifar_stem": True, "blocks": 2}


def test_bad_backbone_inputs_exit_2(tmp_path, capsys):
    def error(*argv):
        code = main(list(argv))
        return code, capsys.readouterr().err.strip()
    code, err = error("pretrain", "--backbone", "resnet19", "--dataset", "sample", "--out", str(tmp_path / "a"))
    assert code == 2 and "unknown backbone 'resnet19'" in err
    code, err = error("transfer", "--init", "torchvision:resnet18", "--layers", "6", "--dataset", "sample",
                      "--limit", "20", "--out", str(tmp_path / "b"))
    assert code == 2 and "5 trained block(s)" in err
    big = tmp_path / "big.npz"
    np.savez(big, images=np.zeros((4, 224, 224, 3), np.uint8), labels=np.arange(4) % 2)
    code, err = error("transfer", "--init", "random", "--backbone", "resnet18", "--cifar-stem", "--layers", "1",
                      "--mode", "linear", "--dataset", f"npz:{big}", "--out", str(tmp_path / "c"))
    assert code == 2 and "--cifar-stem is for small images" in err
    code, err = error("transfer", "--init", "torchvision:resnet18", "--weights", str(tmp_path / "none.pth"),
                      "--dataset", "sample", "--out", str(tmp_path / "d"))
    assert code == 2 and "no such file" in err


def test_advise_and_features_take_a_torchvision_init(tmp_path):
    from contrastive_lw.features import load_features

    assert main(["features", "--init", "torchvision:mobilenet_v3_small", "--cifar-stem", "--weights", "none",
                 "--layers", "1,2", "--dataset", "sample", "--limit", "20", "--no-progress",
                 "--out", str(tmp_path / "F.npz")]) == 0
    features, labels, meta = load_features(tmp_path / "F.npz")
    assert features.shape[0] == len(labels) == 20 and meta["backbone"]["class"] == "TorchvisionBackbone"
    assert main(["advise", "--init", "torchvision:mobilenet_v3_small", "--cifar-stem", "--blocks", "2",
                 "--dataset", "sample", "--classes", "5-9", "--limit", "100",
                 "--out", str(tmp_path / "advice.json")]) == 0


def test_a_run_written_before_an_arch_setting_existed_still_resumes(tmp_path, images):
    from contrastive_lw.checkpoint import save_checkpoint
    from contrastive_lw.pretrain import LayerwisePretrainer, PretrainConfig

    config = PretrainConfig(arch=ArchConfig(widths=(4, 4)), steps_per_layer=2, batch_size=8)
    run = tmp_path / "run"
    LayerwisePretrainer(config, run, "cpu", progress=False, tensorboard=False).fit(images)
    (run / "layer2.pt").unlink()
    payload = load_checkpoint(run / "layer1.pt", "contrastive-lw/backbone")
    for arch in (payload["arch"], payload["backbone_spec"]["arch"]):
        arch.pop("paddings", None)  # as written before ArchConfig.paddings existed (one dict, saved twice)
    payload.pop("format_version")
    save_checkpoint(payload, run / "layer1.pt")
    LayerwisePretrainer(config, run, "cpu", progress=False, tensorboard=False).fit(images)
    assert (run / "layer2.pt").is_file()


def test_search_index_and_query_with_a_torchvision_init(tmp_path):
    from PIL import Image

    from contrastive_lw.data import load_dataset

    index = tmp_path / "idx"
    assert main(["search", "index", "--init", "torchvision:mobilenet_v3_small", "--cifar-stem", "--layers", "2",
                 "--dataset", "sample", "--limit", "20", "--no-progress", "--out", str(index)]) == 0
    first = load_dataset("sample", "test", limit=20).images[0]
    Image.fromarray(first.permute(1, 2, 0).numpy()).save(tmp_path / "q.png")
    assert main(["search", "query", str(tmp_path / "q.png"), "--index", str(index), "--top", "3",
                 "--out", str(tmp_path / "grid.png")]) == 0
