"""Make the bundled sample: the first N train and M test CIFAR-10 JPEGs of each class, copied
byte for byte from a CIFAR-10 image-folder tree (``train/<class>/*.jpg``, ``test/<class>/*.jpg``).

    python data/make_sample.py [SOURCE] [--train 400] [--test 100]

SOURCE defaults to ``../shared/data/cifar10`` (relative to the repository root). Running it again
leaves the same files: missing or changed ones are copied, others in ``data/sample`` removed.
"""
from __future__ import annotations

import argparse
import filecmp
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_sample(source: Path, dest: Path, per_split: dict[str, int]) -> int:
    """Copy the first files of every class folder; returns how many files the sample holds."""
    if not all((source / split).is_dir() for split in per_split):
        raise SystemExit(f"{source} has no {'/'.join(per_split)} folders of CIFAR-10 class folders")
    keep = set()
    for split, n in per_split.items():
        for class_dir in sorted(d for d in (source / split).iterdir() if d.is_dir()):
            out = dest / split / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for image in sorted(class_dir.glob("*.jpg"))[:n]:
                target = out / image.name
                if not target.exists() or not filecmp.cmp(image, target, shallow=False):
                    shutil.copyfile(image, target)
                keep.add(target)
    for stale in [f for f in dest.rglob("*") if f.is_file() and f not in keep]:
        stale.unlink()
    return len(keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, default=REPO.parent / "shared" / "data" / "cifar10")
    parser.add_argument("--train", type=int, default=400, help="train images per class")
    parser.add_argument("--test", type=int, default=100, help="test images per class")
    args = parser.parse_args()
    count = make_sample(args.source, REPO / "data" / "sample", {"train": args.train, "test": args.test})
    print(f"data/sample holds {count} images")


if __name__ == "__main__":
    main()
