"""Wall time of the whole ``paper.yaml`` study without CIFAR-100: a stand-in dataset of the real
sizes (CIFAR-100: 100 classes x 500 train / 100 test images; CIFAR-10: 10 x 5 000 / 1 000), made by
repeating the bundled sample's real 32 x 32 images, then ``contrastive-lw compare`` on it.

The accuracies of such a run mean nothing (images repeat across classes); the times are those of the
real study, whose cost depends only on the data's sizes. Writes ``timing.json`` into ``--out``::

    python experiments/paper_timing.py --out runs/paper-timing [--seeds 0] [--device cuda]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import time
from pathlib import Path

from contrastive_lw.config import load_yaml, to_dict
from contrastive_lw.data import SAMPLE_DIR
from contrastive_lw.memory import keep_freed_memory
from contrastive_lw.runs import prepare_run_dir
from contrastive_lw.study import Study, StudyConfig

PAPER_CONFIG = Path(__file__).parent / "configs" / "paper.yaml"
SIZES = {"cifar100": (100, 500, 100), "cifar10": (10, 5000, 1000)}   # classes, train and test per class


def make_stand_in(root: Path) -> None:
    """``root/{cifar100,cifar10}/{train,test}/<class>/*.jpg`` of the real sizes, hard links to the
    sample's images (a copy where links are not possible)."""
    for name, (classes, *per_split) in SIZES.items():
        for split, per_class in zip(("train", "test"), per_split):
            if (root / name / split).is_dir():
                continue
            pool = itertools.cycle(sorted((SAMPLE_DIR / split).glob("*/*.jpg")))
            for c in range(classes):
                folder = root / name / split / f"class{c:03d}"
                folder.mkdir(parents=True)
                for i in range(per_class):
                    _link(next(pool), folder / f"{i:04d}.jpg")


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--data", type=Path, default=None, help="where the stand-in data goes (default OUT/data)")
    parser.add_argument("--config", type=Path, default=PAPER_CONFIG, help="study YAML (default: paper.yaml)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the config's")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    keep_freed_memory()  # as the command line does
    data_root = args.data or args.out / "data"
    make_stand_in(data_root)
    config = StudyConfig.from_dict(load_yaml(args.config))
    config = dataclasses.replace(config, data_root=str(data_root),
                                 seeds=tuple(args.seeds) if args.seeds else config.seeds)
    study_dir = prepare_run_dir(args.out / "study", {"study": to_dict(config)})
    study = Study(config, study_dir, args.device, progress=False)
    start = time.perf_counter()
    data = study.load_data()
    loaded = time.perf_counter()
    records = study.run(data)
    done = time.perf_counter()
    timing = {"seeds": list(config.seeds), "runs": len(records), "load_s": loaded - start,
              "study_s": done - loaded, "total_s": done - start,
              "transfer_run_s": {f"{r['init']}-{r['mode']}-k{r['layers']}-seed{r['seed']}": r["seconds"]
                                 for r in records}}
    (args.out / "timing.json").write_text(json.dumps(timing, indent=2))
    print(json.dumps({k: v for k, v in timing.items() if k != "transfer_run_s"}))


if __name__ == "__main__":
    main()
