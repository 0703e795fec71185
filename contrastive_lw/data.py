"""Every image source loaded into one in-memory form: uint8 images N x C x H x W, labels, names."""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

DATASETS = ("cifar10", "cifar100", "sample")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "sample"


@dataclass
class ImageData:
    """uint8 ``images`` N x C x H x W, int64 ``labels`` (None when unlabeled), ``class_names``."""

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: torch.Tensor) -> ImageData:
        labels = None if self.labels is None else self.labels[index]
        return ImageData(self.images[index].contiguous(), labels, self.class_names)


def default_data_root() -> Path:
    """``$CONTRASTIVE_LW_DATA``, else ``./data``."""
    return Path(os.environ.get("CONTRASTIVE_LW_DATA", "data"))


def load_dataset(name: str, split: str = "train", data_root: str | Path | None = None,
                 classes: str | Sequence[int | str] | None = None, limit: int | None = None,
                 download: bool = False) -> ImageData:
    """Load ``name``: ``cifar10``, ``cifar100``, ``sample`` (bundled), ``folder:PATH`` or ``npz:PATH``.

    Args:
        split: ``train`` or ``test`` (ignored by a class-folder tree without train/test and by npz).
        data_root: where CIFAR is looked for; a ``ROOT/cifar10/{train,test}/<class>/*.jpg`` tree is
            read directly, else torchvision's own layout.
        classes: keep these classes (``"0-4"``, ``"cat,dog"``, or a list), relabelled 0..n-1.
        limit: keep the first ``limit`` images, class-balanced (round-robin over classes).
        download: let torchvision download CIFAR into ``data_root``.

    Raises:
        DataError: unknown name, missing or empty data, images of mixed sizes, bad classes.

    Example:
        >>> data = load_dataset("sample", classes="0-4")    # doctest: +SKIP
        >>> data.images.shape, data.class_names[:2]         # doctest: +SKIP
        (torch.Size([2500, 3, 32, 32]), ['airplane', 'automobile'])
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(data_root) if data_root is not None else default_data_root()
    if name in ("cifar10", "cifar100"):
        data = _load_cifar(name, split, root, download)
    elif name == "sample":
        if not SAMPLE_DIR.is_dir():
            raise DataError(f"the bundled sample ({SAMPLE_DIR}) ships with the source checkout: "
                            "install with `pip install -e .` from a clone, or use --dataset cifar10")
        data = load_folder(SAMPLE_DIR, split)
    elif name.startswith("folder:"):
        data = load_folder(Path(name[len("folder:"):]), split)
    elif name.startswith("npz:"):
        data = load_npz(Path(name[len("npz:"):]))
    else:
        raise DataError(f"unknown dataset {name!r}: use one of {list(DATASETS)}, folder:PATH or npz:PATH")
    if classes is not None:
        data = select_classes(data, parse_classes(classes, data.class_names))
    if limit is not None:
        data = balanced_limit(data, limit)
    return data


def parse_classes(spec: str | Sequence[int | str], class_names: Sequence[str]) -> list[int]:
    """Class indices from ``"0-4"``, ``"0,2,5"``, ``"cat,dog"`` or a list of names / indices."""
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    indices: list[int] = []
    for item in items:
        if isinstance(item, int) or str(item).isdigit():
            indices.append(int(item))
        elif isinstance(item, str) and re.fullmatch(r"\d+-\d+", item):
            low, high = map(int, item.split("-"))
            indices.extend(range(low, high + 1))
        elif item in class_names:
            indices.append(list(class_names).index(item))
        else:
            raise DataError(f"unknown class {item!r}; classes are {list(class_names)} (or indices like 0-4)")
    bad = [i for i in indices if not 0 <= i < len(class_names)]
    if bad or not indices:
        raise DataError(f"class indices {bad or spec} out of range 0..{len(class_names) - 1}")
    return indices


def select_classes(data: ImageData, indices: Sequence[int]) -> ImageData:
    """Keep the images of ``indices``, relabelled 0..n-1 in that order."""
    if data.labels is None:
        raise DataError("--classes needs a labelled dataset")
    mapping = torch.full((len(data.class_names),), -1, dtype=torch.long)
    mapping[torch.tensor(indices)] = torch.arange(len(indices))
    keep = mapping[data.labels] >= 0
    return ImageData(data.images[keep].contiguous(), mapping[data.labels[keep]],
                     [data.class_names[i] for i in indices])


def balanced_limit(data: ImageData, limit: int) -> ImageData:
    """The first ``limit`` images taking classes in turn (each class's images in their order)."""
    if limit < 1:
        raise DataError(f"--limit must be a positive number of images, got {limit}")
    if data.labels is None:
        return data.subset(torch.arange(min(limit, len(data))))
    # rank of each image within its class, then order by (rank, class): round-robin
    order = torch.argsort(data.labels, stable=True)
    sorted_labels = data.labels[order]
    starts = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - starts
    key = rank * len(data.class_names) + data.labels
    return data.subset(torch.argsort(key)[:limit].sort().values)


def _load_cifar(name: str, split: str, root: Path, download: bool) -> ImageData:
    folder = root / name / split
    if folder.is_dir():
        return load_folder(root / name, split)
    from torchvision import datasets

    dataset_class = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        dataset = dataset_class(str(root), train=split == "train", download=download)
    except RuntimeError:
        raise DataError(f"{name} not found in {root}: pass --download to fetch it with torchvision, or "
                        f"--data-root DIR for a folder holding it ({name}/train/<class>/*.jpg or "
                        "torchvision's files)") from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return ImageData(images, torch.tensor(dataset.targets, dtype=torch.long), list(dataset.classes))


def load_folder(path: Path, split: str = "train") -> ImageData:
    """An image-folder tree: ``path/{train,test}/<class>/*`` or just ``path/<class>/*``.

    Decoded images are cached (see :func:`cache_dir`) keyed by the folder, its class folders'
    modification times and file counts, so a second load skips decoding.
    """
    root = path / split if (path / split).is_dir() else path
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist: check --dataset folder:PATH / --data-root")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for d in class_dirs]
    if not class_dirs or not any(files):
        raise DataError(f"{root} holds no images: expected one sub-folder of images per class")
    key = hashlib.sha1(repr([str(root.resolve())] + [(d.name, d.stat().st_mtime_ns, len(f))
                                                     for d, f in zip(class_dirs, files)]).encode()).hexdigest()
    cached = cache_dir() / f"folder-{key[:16]}.pt"
    names = [d.name for d in class_dirs]
    if cached.is_file():
        try:
            saved = torch.load(cached, weights_only=True)
            return ImageData(saved["images"], saved["labels"], names)
        except Exception:
            cached.unlink(missing_ok=True)  # corrupt cache: decode again
    paths = [f for fs in files for f in fs]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        decoded = list(pool.map(decode_image, paths))
    shapes = {}
    for p, img in zip(paths, decoded):
        shapes.setdefault(img.shape, p)
    if len(shapes) > 1:
        (first, _), (odd_shape, odd) = list(shapes.items())[:2]
        raise DataError(f"images differ in size: {odd} is {tuple(odd_shape)} (C x H x W), others "
                        f"{tuple(first)}; resize them to one size first")
    images = torch.stack(decoded)
    labels = torch.tensor([i for i, fs in enumerate(files) for _ in fs], dtype=torch.long)
    _save_atomic({"images": images, "labels": labels}, cached)
    return ImageData(images, labels, names)


def decode_image(path: Path) -> torch.Tensor:
    """One image file as uint8 RGB C x H x W."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()
    except OSError:
        raise DataError(f"cannot decode image {path}: remove or replace the file") from None


def load_npz(path: Path) -> ImageData:
    """An .npz with ``images`` (N x H x W x C or N x C x H x W uint8), optional ``labels``, ``class_names``."""
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist")
    try:
        arrays = np.load(path, allow_pickle=False)
        images = arrays["images"]
    except (OSError, ValueError, KeyError):
        raise DataError(f"{path} is not an .npz file with an 'images' array") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"{path}: images must be uint8 with 4 dims (N x H x W x C), got "
                        f"{images.dtype} {images.shape}")
    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    labels = torch.from_numpy(arrays["labels"].astype(np.int64)) if "labels" in arrays else None
    if labels is not None and len(labels) != len(images):
        raise DataError(f"{path}: {len(labels)} labels for {len(images)} images")
    if "class_names" in arrays:
        names = [str(n) for n in arrays["class_names"]]
    else:
        names = [str(i) for i in range(int(labels.max()) + 1)] if labels is not None else []
    return ImageData(torch.from_numpy(np.ascontiguousarray(images)), labels, names)


def cache_dir() -> Path:
    """``$CONTRASTIVE_LW_CACHE``, else ``~/.cache/contrastive_lw``."""
    return Path(os.environ.get("CONTRASTIVE_LW_CACHE", Path.home() / ".cache" / "contrastive_lw"))


def _save_atomic(payload: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
