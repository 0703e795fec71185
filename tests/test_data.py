from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from contrastive_lw import data as data_module
from contrastive_lw.data import balanced_limit, balanced_split, load_dataset, parse_classes
from contrastive_lw.errors import DataError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTRASTIVE_LW_CACHE", str(tmp_path / "cache"))


def _tree(root, classes=("cat", "dog", "emu"), per_class=3, size=8, suffix="png"):
    """Image (class c, number i) has pixel (c * 80, i * 40, 7) everywhere."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (c * 80, i * 40, 7)).save(root / name / f"{i}.{suffix}")
    return root


def _ids(data):
    """(red / 80, green / 40) of every image: which class folder and which file it came from."""
    return [(int(r) // 80, int(g) // 40) for r, g in data.images[:, :2, 0, 0].tolist()]


def test_folder_with_and_without_splits(tmp_path):
    _tree(tmp_path / "plain")
    flat = load_dataset(f"folder:{tmp_path / 'plain'}")
    assert flat.images.shape == (9, 3, 8, 8) and flat.images.dtype == torch.uint8 and flat.images.is_contiguous()
    assert flat.class_names == ["cat", "dog", "emu"] and flat.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert flat.labels.dtype == torch.int64 and _ids(flat)[4] == (1, 1)
    assert torch.equal(load_dataset(f"folder:{tmp_path / 'plain'}", "test").images, flat.images)  # no split
    _tree(tmp_path / "split" / "train")
    _tree(tmp_path / "split" / "test", classes=("cat", "dog"), per_class=1, suffix="bmp")  # PIL fallback
    test = load_dataset(f"folder:{tmp_path / 'split'}", "test")
    assert len(test) == 2 and test.class_names == ["cat", "dog"] and _ids(test) == [(0, 0), (1, 0)]
    assert len(load_dataset(f"folder:{tmp_path / 'split'}", "train")) == 9


def test_grayscale_and_rgba_become_rgb(tmp_path):
    (tmp_path / "t" / "a").mkdir(parents=True)
    Image.new("L", (4, 4), 200).save(tmp_path / "t" / "a" / "0.png")
    Image.new("RGBA", (4, 4), (1, 2, 3, 4)).save(tmp_path / "t" / "a" / "1.png")
    images = load_dataset(f"folder:{tmp_path / 't'}").images
    assert images.shape == (2, 3, 4, 4) and images[0, :, 0, 0].tolist() == [200] * 3
    assert images[1, :, 0, 0].tolist() == [1, 2, 3]


def test_classes_relabel_and_balanced_limit(tmp_path):
    name = f"folder:{_tree(tmp_path / 't', per_class=4)}"
    subset = load_dataset(name, classes="emu,cat")
    assert subset.class_names == ["emu", "cat"] and subset.labels.tolist() == [1] * 4 + [0] * 4
    assert [c for c, _ in _ids(subset)] == [0] * 4 + [2] * 4  # images keep their order
    numeric = load_dataset(name, classes="1-2")
    assert numeric.class_names == ["dog", "emu"] and numeric.labels.tolist() == [0] * 4 + [1] * 4
    limited = load_dataset(name, limit=5)  # round-robin: 2, 2, 1
    assert _ids(limited) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    both = load_dataset(name, classes=[2, "dog"], limit=3)  # limit after classes
    assert both.class_names == ["emu", "dog"] and _ids(both) == [(1, 0), (2, 0), (2, 1)]
    assert both.labels.tolist() == [1, 0, 0]
    assert len(load_dataset(name, limit=100)) == 12


def test_balanced_split_keeps_the_limit_and_returns_the_rest(tmp_path):
    data = load_dataset(f"folder:{_tree(tmp_path / 't', per_class=4)}")
    first, rest = balanced_split(data, 5)
    assert _ids(first) == _ids(balanced_limit(data, 5))
    assert sorted(_ids(first) + _ids(rest)) == sorted(_ids(data)) and len(rest) == 7
    assert rest.labels.tolist() == [0, 0, 1, 1, 2, 2, 2] and rest.class_names == data.class_names


def test_parse_classes():
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog"]
    assert parse_classes("0-4", names) == [0, 1, 2, 3, 4]
    assert parse_classes("0,2,5", names) == [0, 2, 5]
    assert parse_classes("cat, dog", names) == [3, 5]
    assert parse_classes([4, "2", "dog"], names) == [4, 2, 5]
    for spec, message in [("9-11", "out of range"), ("4-0", "empty"), ("cat,3", "twice"), ("wolf", "unknown class")]:
        with pytest.raises(DataError, match=message):
            parse_classes(spec, names)


def test_npz_layouts_and_names(tmp_path):
    hwc = np.random.default_rng(0).integers(0, 255, (5, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=hwc, labels=np.array([0, 1, 0, 1, 0]), class_names=["x", "y"])
    a = load_dataset(f"npz:{tmp_path / 'a.npz'}")
    assert a.images.shape == (5, 3, 6, 6) and a.images.is_contiguous()
    assert torch.equal(a.images[2], torch.from_numpy(hwc[2]).permute(2, 0, 1))
    assert a.class_names == ["x", "y"] and a.labels.dtype == torch.int64 and a.labels.tolist() == [0, 1, 0, 1, 0]
    np.savez(tmp_path / "b.npz", images=hwc.transpose(0, 3, 1, 2))
    b = load_dataset(f"npz:{tmp_path / 'b.npz'}")
    assert b.labels is None and torch.equal(b.images, a.images)
    np.savez(tmp_path / "c.npz", images=hwc, labels=np.array([0, 2, 0, 1, 0]))
    assert load_dataset(f"npz:{tmp_path / 'c.npz'}").class_names == ["0", "1", "2"]


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 4, 4, 3), np.float32)}, "uint8"),
    ({"images": np.zeros((2, 4, 4), np.uint8)}, "uint8 N x H x W x C"),
    ({"images": np.zeros((2, 4, 4, 5), np.uint8)}, "channel"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.zeros(3, np.int64)}, "2 non-negative integers"),
    ({"pixels": np.zeros((2, 4, 4, 3), np.uint8)}, "'images' array"),
])
def test_bad_npz(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    name = f"folder:{_tree(tmp_path / 't')}"
    first = load_dataset(name)
    (cached,) = (tmp_path / "cache").iterdir()
    decode = data_module.decode_image

    def no_decoding(path):
        raise AssertionError("decoded again")
    monkeypatch.setattr(data_module, "decode_image", no_decoding)
    again = load_dataset(name)
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    assert again.class_names == first.class_names
    monkeypatch.setattr(data_module, "decode_image", decode)
    cached.write_bytes(b"corrupt")  # ignored and rebuilt
    assert torch.equal(load_dataset(name).images, first.images) and cached.stat().st_size > 100
    _tree(tmp_path / "t", classes=("fox",))  # a new class folder invalidates the cache
    assert load_dataset(name).class_names == ["cat", "dog", "emu", "fox"]


def test_an_image_replaced_in_place_is_decoded_again(tmp_path):
    """Same file name, same folder mtime (restored), new content: the cache must not serve the old one."""
    import os

    root = _tree(tmp_path / "t")
    first = load_dataset(f"folder:{root}")
    folder_times = os.stat(root / "dog")
    Image.new("RGB", (8, 8), (250, 250, 250)).save(root / "dog" / "1.png", compress_level=0)
    os.utime(root / "dog", ns=(folder_times.st_atime_ns, folder_times.st_mtime_ns))
    again = load_dataset(f"folder:{root}")
    assert int(again.images[4, 0, 0, 0]) == 250 and int(first.images[4, 0, 0, 0]) == 80


def test_default_data_root_is_outside_the_checkout(monkeypatch):
    """``--download`` without ``--data-root`` never writes into the repository (whose data/ is tracked)."""
    from pathlib import Path

    from contrastive_lw.data import default_data_root

    checkout = Path(data_module.__file__).resolve().parents[1]
    monkeypatch.chdir(checkout)
    monkeypatch.delenv("CONTRASTIVE_LW_DATA", raising=False)
    assert not default_data_root().resolve().is_relative_to(checkout)
    monkeypatch.setenv("CONTRASTIVE_LW_DATA", "/somewhere/else")
    assert default_data_root() == Path("/somewhere/else")


def test_bundled_sample():
    train, test = load_dataset("sample"), load_dataset("sample", "test")
    assert train.images.shape == (4000, 3, 32, 32) and test.images.shape == (1000, 3, 32, 32)
    assert train.class_names == ["airplane", "automobile", "bird", "cat", "deer",
                                 "dog", "frog", "horse", "ship", "truck"] == test.class_names
    assert torch.bincount(train.labels).tolist() == [400] * 10 and torch.bincount(test.labels).tolist() == [100] * 10


def test_sample_missing_from_an_installed_package(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "SAMPLE_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match="source checkout"):
        load_dataset("sample")


def test_cifar_folder_layout_under_data_root(tmp_path):
    _tree(tmp_path / "cifar10" / "train", classes=("airplane", "automobile"))
    assert load_dataset("cifar10", data_root=tmp_path).class_names == ["airplane", "automobile"]
    with pytest.raises(DataError, match="--data-root"):  # no test folder, no torchvision files
        load_dataset("cifar10", "test", data_root=tmp_path)


def test_cifar_from_torchvision_and_failed_download(tmp_path, monkeypatch):
    class FakeCIFAR:
        def __init__(self, root, train, download):
            self.data = np.full((4, 32, 32, 3), 9 if train else 5, np.uint8)
            self.data[:, 0, 1] = (1, 2, 3)
            self.targets, self.classes = [0, 1, 1, 0], ["apple", "bee"]
    monkeypatch.setattr(datasets, "CIFAR100", FakeCIFAR)
    data = load_dataset("cifar100", "test", data_root=tmp_path)
    assert data.images.shape == (4, 3, 32, 32) and data.images.is_contiguous() and int(data.images.max()) == 5
    assert data.images[0, :, 0, 1].tolist() == [1, 2, 3] and data.labels.dtype == torch.int64
    assert data.class_names == ["apple", "bee"]

    def offline(root, train, download):
        raise URLError("no network")
    monkeypatch.setattr(datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="downloading cifar10 .* failed .*--data-root"):
        load_dataset("cifar10", data_root=tmp_path, download=True)


@pytest.mark.parametrize("case", ["unknown", "missing_cifar", "empty", "no_folder", "mixed_sizes", "bad_class",
                                  "not_image", "bad_split", "bad_limit", "unlabeled_classes"])
def test_bad_data_gets_a_clear_error(tmp_path, case):
    expected = {"unknown": "unknown dataset 'mnist': use one of cifar10, cifar100, sample, folder:PATH or npz:PATH",
                "missing_cifar": "cifar10 \\(train\\) not found in .*: pass --download .* or --data-root DIR",
                "empty": "holds no images", "no_folder": "does not exist",
                "mixed_sizes": "dog.big.png is 9x7 \\(H x W\\) but .*cat.0.png is 8x8",
                "bad_class": "unknown class 'wolf'; classes are \\['cat', 'dog', 'emu'\\]",
                "not_image": "cannot decode image .*broken.jpg", "bad_split": "split must be",
                "bad_limit": "positive", "unlabeled_classes": "labelled"}[case]
    name, kwargs = f"folder:{tmp_path / 't'}", {}
    if case == "unknown":
        name = "mnist"
    elif case == "missing_cifar":
        name, kwargs = "cifar10", {"data_root": tmp_path}
    elif case == "empty":
        (tmp_path / "t" / "cat").mkdir(parents=True)
        (tmp_path / "t" / "cat" / "notes.txt").write_text("no images here")
    elif case == "mixed_sizes":
        _tree(tmp_path / "t")
        Image.new("RGB", (7, 9)).save(tmp_path / "t" / "dog" / "big.png")
    elif case == "bad_class":
        _tree(tmp_path / "t")
        kwargs = {"classes": "cat,wolf"}
    elif case == "not_image":
        _tree(tmp_path / "t")
        (tmp_path / "t" / "cat" / "broken.jpg").write_text("not a jpeg")
    elif case == "bad_split":
        kwargs = {"split": "val"}
    elif case == "bad_limit":
        _tree(tmp_path / "t")
        kwargs = {"limit": 0}
    elif case == "unlabeled_classes":
        np.savez(tmp_path / "u.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
        name, kwargs = f"npz:{tmp_path / 'u.npz'}", {"classes": "0"}
    with pytest.raises(DataError, match=expected):
        load_dataset(name, **kwargs)
