"""A small real CIFAR-10 subset for the GPU check (``experiments/gpu_check.py``), whose machine has
no copy of the datasets: one uint8 ``.npz`` (``images`` N x 3 x 32 x 32, ``labels``,
``class_names``, ``split``: 0 train / 1 test) of class-balanced training and test images,
compressed (10 000 images: ~25 MB)::

    python experiments/make_gpu_subset.py --data-root ../shared/data [--out data/gpu_subset.npz]

The default output path is ignored by git; carry it to the GPU machine with the checkout.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from contrastive_lw.data import ImageData, load_dataset, load_npz

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data" / "gpu_subset.npz"


def make_subset(out: Path, dataset: str = "cifar10", data_root: str | Path | None = None, train: int = 8000,
                test: int = 2000) -> Path:
    """Write ``train`` + ``test`` class-balanced images of ``dataset`` to ``out`` (see the module doc)."""
    parts = [load_dataset(dataset, split, data_root, limit=n) for split, n in (("train", train), ("test", test))]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=torch.cat([p.images for p in parts]).numpy(),
                        labels=torch.cat([p.labels for p in parts]).numpy(),
                        class_names=np.array(parts[0].class_names),
                        split=np.repeat(np.arange(2, dtype=np.uint8), [len(p.images) for p in parts]))
    return out


def load_subset(path: str | Path) -> tuple[ImageData, ImageData]:
    """The (train, test) parts of a subset written by :func:`make_subset`."""
    data = load_npz(Path(path))
    with np.load(path) as arrays:
        test = torch.from_numpy(arrays["split"].astype(bool))
    return (ImageData(data.images[~test], data.labels[~test], data.class_names),
            ImageData(data.images[test], data.labels[test], data.class_names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-root", default=None, help="holds cifar10/{train,test}/<class>/*.jpg or torchvision's files")
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--test", type=int, default=2000)
    args = parser.parse_args()
    out = make_subset(args.out, args.dataset, args.data_root, args.train, args.test)
    print(f"{out}: {args.train} + {args.test} images, {out.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
