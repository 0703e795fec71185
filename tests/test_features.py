import numpy as np
import pytest
import torch

from contrastive_lw.backbones import BackboneConfig, build_backbone
from contrastive_lw.cli import main
from contrastive_lw.config import to_dict
from contrastive_lw.errors import ConfigError, DataError
from contrastive_lw.features import describe, export_features, load_features, save_features
from contrastive_lw.model import ArchConfig, LayerwiseNet


def test_features_shape_dtype_and_round_trip(images, tmp_path):
    net = LayerwiseNet(ArchConfig(widths=(4, 6)))
    features = export_features(net, images, [2, 1], pool=2, batch_size=10, progress=False)
    assert features.shape == (64, 4 * 4 + 6 * 4) and features.dtype == torch.float32
    labels = torch.arange(64) % 3
    path = save_features(tmp_path / "F.npz", features, labels, describe(net, [1, 2], 2), dtype="float16")
    saved, saved_labels, meta = load_features(path)
    assert saved.dtype == np.float16 and saved.shape == (64, 40) and np.array_equal(saved_labels, labels.numpy())
    assert np.allclose(saved, features.numpy(), rtol=1e-2, atol=1e-3)
    assert meta["layers"] == [1, 2] and meta["backbone"]["spec"] == {"name": "lw", "arch": to_dict(net.arch)}


def test_describe_names_a_torchvision_backbone():
    net = build_backbone(BackboneConfig(name="resnet18", cifar_stem=True, blocks=2))
    assert describe(net, [2], 4)["backbone"]["spec"] == {"name": "resnet18", "cifar_stem": True, "blocks": 2}


def test_bad_layers_and_images_are_rejected(images):
    net = LayerwiseNet(ArchConfig(widths=(4,)))
    with pytest.raises(ConfigError, match="1..1"):
        export_features(net, images, [2])
    with pytest.raises(DataError, match="1 channel"):
        export_features(net, images[:, :1], [1])


def test_features_command(tmp_path, capsys):
    out = tmp_path / "F.npz"
    assert main(["features", "--init", "random", "--layers", "1,2", "--dataset", "sample", "--limit", "20",
                 "--dtype", "float16", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    features, labels, meta = load_features(out)
    assert features.shape == (20, 64 * 16 + 128 * 16) and features.dtype == np.float16 and len(labels) == 20
    assert meta["init"] == "random" and meta["data"]["split"] == "test"
