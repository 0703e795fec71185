import numpy as np
import pytest
import torch
from PIL import Image

from contrastive_lw import data as data_module
from contrastive_lw.data import load_dataset, parse_classes
from contrastive_lw.errors import DataError


def _tree(root, classes=("cat", "dog", "emu"), per_class=3, size=8):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (c * 80, i * 40, 7)).save(root / name / f"{i}.png")
    return root


def test_folder_with_and_without_splits(tmp_path):
    _tree(tmp_path / "plain")
    flat = load_dataset(f"folder:{tmp_path / 'plain'}")
    assert flat.images.shape == (9, 3, 8, 8) and flat.images.dtype == torch.uint8
    assert flat.class_names == ["cat", "dog", "emu"] and flat.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert int(flat.images[4, 0, 0, 0]) == 80 and int(flat.images[4, 1, 0, 0]) == 40
    _tree(tmp_path / "split" / "train")
    _tree(tmp_path / "split" / "test", per_class=1)
    assert len(load_dataset(f"folder:{tmp_path / 'split'}", "test")) == 3


def test_classes_relabel_and_balanced_limit(tmp_path):
    _tree(tmp_path / "t")
    subset = load_dataset(f"folder:{tmp_path / 't'}", classes="emu,cat")
    assert subset.class_names == ["emu", "cat"] and sorted(subset.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert load_dataset(f"folder:{tmp_path / 't'}", classes="1-2").class_names == ["dog", "emu"]
    limited = load_dataset(f"folder:{tmp_path / 't'}", limit=5)
    assert sorted(limited.labels.tolist()) == [0, 0, 1, 1, 2]


def test_parse_classes():
    names = [str(i) for i in range(10)]
    assert parse_classes("0-4", names) == [0, 1, 2, 3, 4]
    assert parse_classes([7, "2"], names) == [7, 2]
    with pytest.raises(DataError, match="out of range"):
        parse_classes("9-11", names)


def test_npz_both_layouts(tmp_path):
    hwc = np.random.randint(0, 255, (5, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=hwc, labels=np.array([0, 1, 0, 1, 0]))
    a = load_dataset(f"npz:{tmp_path / 'a.npz'}")
    assert a.images.shape == (5, 3, 6, 6) and torch.equal(a.images[2], torch.from_numpy(hwc[2]).permute(2, 0, 1))
    np.savez(tmp_path / "b.npz", images=hwc.transpose(0, 3, 1, 2))
    assert load_dataset(f"npz:{tmp_path / 'b.npz'}").labels is None
    np.savez(tmp_path / "c.npz", images=hwc.astype(np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_dataset(f"npz:{tmp_path / 'c.npz'}")


def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    _tree(tmp_path / "t")
    first = load_dataset(f"folder:{tmp_path / 't'}")

    def no_decoding(path):
        raise AssertionError("decoded again")
    monkeypatch.setattr(data_module, "decode_image", no_decoding)
    assert torch.equal(load_dataset(f"folder:{tmp_path / 't'}").images, first.images)


def test_bundled_sample():
    train, test = load_dataset("sample"), load_dataset("sample", "test")
    assert train.images.shape == (4000, 3, 32, 32) and test.images.shape == (1000, 3, 32, 32)
    assert train.class_names[:2] == ["airplane", "automobile"] and len(train.class_names) == 10
    assert torch.bincount(test.labels).tolist() == [100] * 10


def test_cifar_folder_layout_under_data_root(tmp_path):
    _tree(tmp_path / "cifar10" / "train", classes=("airplane", "automobile"))
    assert load_dataset("cifar10", data_root=tmp_path).class_names == ["airplane", "automobile"]


@pytest.mark.parametrize("case", ["unknown", "missing_cifar", "empty", "mixed_sizes", "bad_class", "not_image"])
def test_bad_data_gets_a_clear_error(tmp_path, case):
    expected = {"unknown": "unknown dataset", "missing_cifar": "--download", "empty": "holds no images",
                "mixed_sizes": "differ in size", "bad_class": "unknown class", "not_image": "cannot decode"}[case]
    name, kwargs = f"folder:{tmp_path / 't'}", {}
    if case == "unknown":
        name = "mnist"
    elif case == "missing_cifar":
        name, kwargs = "cifar10", {"data_root": tmp_path}
    elif case == "empty":
        (tmp_path / "t" / "cat").mkdir(parents=True)
    elif case == "mixed_sizes":
        _tree(tmp_path / "t")
        Image.new("RGB", (9, 9)).save(tmp_path / "t" / "dog" / "big.png")
    elif case == "bad_class":
        _tree(tmp_path / "t")
        kwargs = {"classes": "cat,wolf"}
    elif case == "not_image":
        _tree(tmp_path / "t")
        (tmp_path / "t" / "cat" / "broken.jpg").write_text("not a jpeg")
    with pytest.raises(DataError, match=expected) as err:
        load_dataset(name, **kwargs)
    if case == "missing_cifar":
        assert "--data-root" in str(err.value)
