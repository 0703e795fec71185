"""Every image source loaded into one in-memory form: uint8 images N x C x H x W, labels, names."""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as decode_bytes

from .errors import DataError

DATASETS = ("cifar10", "cifar100", "sample")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "sample"
CACHE_VERSION = 2  # part of the cache key: bump when decoding changes


@dataclass
class ImageData:
    """uint8 ``images`` N x C x H x W, int64 ``labels`` (None when unlabeled), ``class_names``."""

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: torch.Tensor) -> ImageData:
        """The images (and labels) at ``index``, same class names."""
        labels = None if self.labels is None else self.labels[index]
        return ImageData(self.images[index].contiguous(), labels, self.class_names)


def default_data_root() -> Path:
    """``$CONTRASTIVE_LW_DATA``, else ``datasets/`` in the cache folder (:func:`cache_dir`): never
    inside a checkout, so a ``--download`` never shows up as files to commit."""
    return Path(os.environ.get("CONTRASTIVE_LW_DATA", cache_dir() / "datasets"))


def load_dataset(name: str, split: str = "train", data_root: str | Path | None = None,
                 classes: str | Sequence[int | str] | None = None, limit: int | None = None,
                 download: bool = False) -> ImageData:
    """Load ``name``: ``cifar10``, ``cifar100``, ``sample`` (bundled), ``folder:PATH`` or ``npz:PATH``.

    Args:
        split: ``train`` or ``test``; ignored by a ``folder:`` tree without train/test sub-folders
            (``PATH/<class>/*``) and by ``npz:``.
        data_root: where CIFAR is looked for (default :func:`default_data_root`): a
            ``ROOT/cifar10/{train,test}/<class>/*.jpg`` tree is read directly, else torchvision's files.
        classes: keep these classes (``"0-4"``, ``"cat,dog"``, or a list), relabelled 0..n-1 in that order.
        limit: keep the first ``limit`` images, class-balanced (round-robin over classes), after ``classes``.
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
            raise DataError(f"the bundled sample ({SAMPLE_DIR}) ships with the source checkout only: "
                            "install with `pip install -e .` from a clone, or use --dataset cifar10")
        data = load_folder(SAMPLE_DIR, split)
    elif name.startswith("folder:") and name != "folder:":
        data = load_folder(Path(name[len("folder:"):]).expanduser(), split)
    elif name.startswith("npz:") and name != "npz:":
        data = load_npz(Path(name[len("npz:"):]).expanduser())
    else:
        raise DataError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}, folder:PATH or npz:PATH")
    if classes is not None:
        data = select_classes(data, classes)
    if limit is not None:
        data = balanced_limit(data, limit)
    return data


def parse_classes(spec: str | Sequence[int | str], class_names: Sequence[str]) -> list[int]:
    """Class indices from ``"0-4"``, ``"0,2,5"``, ``"cat,dog"`` or a list of names / indices."""
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    names = list(class_names)
    indices: list[int] = []
    for item in items:
        if isinstance(item, int) or str(item).isdigit():
            indices.append(int(item))
        elif isinstance(item, str) and re.fullmatch(r"\d+-\d+", item):
            low, high = map(int, item.split("-"))
            if low > high:
                raise DataError(f"class range {item!r} is empty: write it low-high, e.g. 0-4")
            indices.extend(range(low, high + 1))
        elif item in names:
            indices.append(names.index(item))
        else:
            raise DataError(f"unknown class {item!r}; classes are {names} (or indices like 0-4)")
    bad = [i for i in indices if not 0 <= i < len(names)]
    if bad or not indices:
        raise DataError(f"class indices {bad or spec!r} out of range 0..{len(names) - 1}")
    if len(set(indices)) < len(indices):
        raise DataError(f"classes {spec!r} name a class twice")
    return indices


def select_classes(data: ImageData, classes: str | Sequence[int | str]) -> ImageData:
    """Keep the images of ``classes`` (see :func:`parse_classes`), relabelled 0..n-1 in that order."""
    if data.labels is None:
        raise DataError("--classes needs a labelled dataset")
    indices = parse_classes(classes, data.class_names)
    mapping = torch.full((len(data.class_names),), -1, dtype=torch.long)
    mapping[torch.tensor(indices)] = torch.arange(len(indices))
    keep = mapping[data.labels] >= 0
    return ImageData(data.images[keep].contiguous(), mapping[data.labels[keep]],
                     [data.class_names[i] for i in indices])


def balanced_limit(data: ImageData, limit: int) -> ImageData:
    """The first ``limit`` images taking classes in turn (each class's images in their order)."""
    return balanced_split(data, limit)[0]


def balanced_split(data: ImageData, limit: int) -> tuple[ImageData, ImageData]:
    """:func:`balanced_limit`'s ``limit`` images, and the others (both in the data's order)."""
    if limit < 1:
        raise DataError(f"--limit must be a positive number of images, got {limit}")
    if data.labels is None:
        order = torch.arange(len(data))
    else:  # rank of each image within its class, then order by (rank, class): round-robin
        by_class = torch.argsort(data.labels, stable=True)
        sorted_labels = data.labels[by_class]
        starts = torch.searchsorted(sorted_labels, sorted_labels, right=False)
        rank = torch.empty_like(by_class)
        rank[by_class] = torch.arange(len(by_class)) - starts
        order = torch.argsort(rank * len(data.class_names) + data.labels)
    return data.subset(order[:limit].sort().values), data.subset(order[limit:].sort().values)


def _load_cifar(name: str, split: str, root: Path, download: bool) -> ImageData:
    if (root / name / split).is_dir():
        return load_folder(root / name, split)
    from torchvision import datasets

    dataset_class = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    holding = f"--data-root DIR for a folder holding it ({name}/{split}/<class>/*.jpg or torchvision's files)"
    try:
        dataset = dataset_class(str(root), train=split == "train", download=download)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"{name} ({split}) not found in {root.resolve()}: pass --download to fetch it "
                        f"with torchvision, or {holding}") from None
    except OSError as error:  # no network, unwritable root, ...
        raise DataError(f"downloading {name} into {root.resolve()} failed ({error}): fix that, or pass "
                        f"{holding}") from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return ImageData(images, torch.tensor(dataset.targets, dtype=torch.long), list(dataset.classes))


def load_folder(path: Path, split: str = "train") -> ImageData:
    """An image-folder tree: ``path/{train,test}/<class>/*`` or just ``path/<class>/*`` (split ignored).

    Images are converted to RGB and must share one size. Decoded images are cached (see
    :func:`cache_dir`) keyed by the folder and every image's name, size and modification time, so
    a second load skips decoding and an image replaced in place is decoded again.
    """
    root = path / split if (path / split).is_dir() else path
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist: check --dataset folder:PATH / --data-root")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for d in class_dirs]
    if not any(files):
        raise DataError(f"{root} holds no images: expected one sub-folder of images "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))}) per class")
    names = [d.name for d in class_dirs]
    key = repr([CACHE_VERSION, str(root.resolve())] + [(d.name, [(f.name, *_size_and_mtime(f)) for f in fs])
                                                        for d, fs in zip(class_dirs, files)])
    cached = cache_dir() / f"folder-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
    if cached.is_file():
        try:
            saved = torch.load(cached, weights_only=True)
            return ImageData(saved["images"], saved["labels"], names)
        except Exception:  # corrupt or foreign cache file: decode again and overwrite it
            pass
    paths = [f for fs in files for f in fs]
    chunks = [paths[i:i + 1000] for i in range(0, len(paths), 1000)]  # few big tasks: less overhead
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        decoded = [img for chunk in pool.map(lambda c: [decode_image(p) for p in c], chunks) for img in chunk]
    sizes = [tuple(img.shape[1:]) for img in decoded]
    odd = next((i for i, size in enumerate(sizes) if size != sizes[0]), None)
    if odd is not None:
        raise DataError(f"images differ in size: {paths[odd]} is {sizes[odd][0]}x{sizes[odd][1]} (H x W) but "
                        f"{paths[0]} is {sizes[0][0]}x{sizes[0][1]}; resize them to one size first")
    images = torch.stack(decoded)
    labels = torch.tensor([i for i, fs in enumerate(files) for _ in fs], dtype=torch.long)
    _save_atomic({"images": images, "labels": labels}, cached)
    return ImageData(images, labels, names)


def _size_and_mtime(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def decode_image(path: Path, rgb: bool = True) -> torch.Tensor:
    """One image file as uint8 RGB C x H x W (torchvision's decoders; PIL for other formats);
    ``rgb=False`` keeps the file's own channels (grey: 1, RGBA: 4)."""
    raw = path.read_bytes()
    try:
        image = decode_bytes(torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                             mode=ImageReadMode.RGB if rgb else ImageReadMode.UNCHANGED)
        if image.dtype == torch.uint8:
            return image
    except (RuntimeError, ValueError):
        pass  # BMP, TIFF, 16-bit PNG, ...: let PIL try
    try:
        with Image.open(BytesIO(raw)) as img:
            pixels = np.array(img.convert("RGB") if rgb or img.mode not in ("L", "RGB", "RGBA") else img)
            return torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1)).permute(2, 0, 1).contiguous()
    except OSError:
        raise DataError(f"cannot decode image {path}: remove or replace the file") from None


def load_npz(path: Path) -> ImageData:
    """An .npz with ``images`` (N x H x W x C or N x C x H x W uint8, C = 1 or 3), optional ``labels``
    (N integers) and ``class_names``."""
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            images = arrays["images"]
            labels = arrays["labels"] if "labels" in arrays else None
            names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else None
    except (OSError, ValueError, KeyError, EOFError):
        raise DataError(f"{path} is not an .npz file with an 'images' array (and no pickled objects)") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"{path}: images must be uint8 N x H x W x C or N x C x H x W, got "
                        f"{images.dtype} of shape {images.shape}")
    if images.shape[1] not in (1, 3):
        if images.shape[3] not in (1, 3):
            raise DataError(f"{path}: images of shape {images.shape} have no channel axis of 1 or 3")
        images = images.transpose(0, 3, 1, 2)
    if labels is not None:
        if labels.shape != (len(images),) or labels.dtype.kind not in "iu" or (labels < 0).any():
            raise DataError(f"{path}: labels must be {len(images)} non-negative integers, got "
                            f"{labels.dtype} of shape {labels.shape}")
        labels = torch.from_numpy(labels.astype(np.int64))
        if names is None:
            names = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
        elif len(labels) and int(labels.max()) >= len(names):
            raise DataError(f"{path}: label {int(labels.max())} but only {len(names)} class_names")
    return ImageData(torch.from_numpy(np.ascontiguousarray(images)), labels, names or [])


def cache_dir() -> Path:
    """``$CONTRASTIVE_LW_CACHE``, else ``~/.cache/contrastive_lw``."""
    return Path(os.environ.get("CONTRASTIVE_LW_CACHE", Path.home() / ".cache" / "contrastive_lw"))


def _save_atomic(payload: dict[str, torch.Tensor], path: Path) -> None:
    """Write the cache file atomically; a cache that cannot be written only warns."""
    from .checkpoint import write_atomic

    try:
        write_atomic(path, lambda f: torch.save(payload, f))
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError
        warnings.warn(f"could not write the dataset cache {path} ({error}); set CONTRASTIVE_LW_CACHE "
                      "to a writable folder to skip decoding next time", stacklevel=3)
