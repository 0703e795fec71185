"""The GPU check of issue 33: one command (<= 8 min on one GPU) that runs the CUDA-only tests, the
benchmark on the GPU and the paper-protocol timing, and writes every figure, with the GPU's name,
torch / CUDA versions and the date, to one JSON (default ``docs/bench/gpu-<date>.json``)::

    python experiments/make_gpu_subset.py --data-root ../shared/data   # on the CPU machine, once
    python experiments/gpu_check.py                                       # on the GPU machine
    python experiments/gpu_check.py --table docs/bench/gpu-*.json          # the README / PERFORMANCE table

Data: the real subset (``data/gpu_subset.npz``, 8 000 + 2 000 CIFAR-10 images) for the bench's race
(pretraining on classes 0-4, linear probe on 5-9); for the timing, in-memory stand-ins of the
paper's real sizes (50 000 source images in 100 classes, 50 000 + 10 000 target images) made by
repeating the subset's images: their accuracies mean little, their times are the real study's.

The paper timing runs ``paper.yaml`` with every phase shortened and projects it linearly to the
full protocol: pretraining ``--pretrain-fraction`` of its steps, the supervised baseline
``--supervised-epochs`` of 30, every transfer run ``--transfer-epochs`` of 100, the transfer runs
trained ``--ensemble`` at a time (``compare --ensemble``). Fixed costs (warm-up, graph capture) are
scaled with the rest: the projection is an upper bound. One separate transfer run of one epoch is
timed too, for the ensemble's speed-up.

On a machine without CUDA the script stops at once ("needs a CUDA device", exit status 2);
``--dry-run`` runs the whole flow on the CPU at tiny sizes (the test suite does, in seconds).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "experiments"))

from make_gpu_subset import DEFAULT_OUT as DEFAULT_SUBSET, load_subset  # noqa: E402

from contrastive_lw.bench import BenchConfig, describe_device, run_bench  # noqa: E402
from contrastive_lw.config import load_yaml  # noqa: E402
from contrastive_lw.data import ImageData, balanced_limit, select_classes  # noqa: E402
from contrastive_lw.model import ArchConfig  # noqa: E402
from contrastive_lw.study import Study, StudyConfig, StudyData  # noqa: E402
from contrastive_lw.transfer import train_transfer  # noqa: E402

PAPER = ROOT / "experiments" / "configs" / "paper.yaml"
FULL = {"source": 50_000, "target": 50_000, "test": 10_000}   # CIFAR-100 / CIFAR-10 train, test images
TINY = {"source": 200, "target": 120, "test": 60}
PARTS = ("tests", "bench", "paper")
# The targets: (name, key in the figures, comparison, threshold)
TARGETS = (("paper.yaml study, projected wall minutes", "paper_projected_min", "<=", 10.0),
           ("sampler + augmentation / layer-1 step (patches/s)", "pipeline_ratio", ">=", 5.0),
           ("layer-1 greedy step, fraction of matmul rate", "layer1_fraction_of_matmul", ">=", 0.25),
           ("greedy time / end-to-end time to its probe accuracy", "race_time_ratio", "<=", 0.5))


def environment(device: torch.device) -> dict:
    """The machine and software the figures belong to."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": describe_device(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None}


def cuda_tests(paths: Sequence[str], timeout_s: float) -> dict:
    """``pytest -m cuda`` (every test that skips without CUDA) on ``paths``: counts and wall time."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-rs", "-p", "no:cacheprovider", *paths],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", done.stdout)}
    return {"rc": done.returncode, "seconds": time.perf_counter() - start, **counts,
            "tail": done.stdout.strip().splitlines()[-15:]}


def bench_figures(train: ImageData, test: ImageData, device: str, tiny: bool, say: Callable[[str], None],
                  race_batch: int = 2048) -> dict:
    """``contrastive-lw bench`` on the subset: pretraining on classes 0-4, the probe on 5-9."""
    config = (BenchConfig(arch=ArchConfig(widths=(8,)), batch_sizes=(64,), race_batch=32, timed_steps=1,
                          layerwise_steps=(4,), end2end_steps=(4,), resolution=1.0, paired_rounds=0) if tiny else
              BenchConfig(batch_sizes=(32768, 8192), race_batch=race_batch, probe_images=4000, paired_rounds=1))
    source = select_classes(train, "0-4").images
    return run_bench(source, select_classes(train, "5-9"), select_classes(test, "5-9"), config, device, say)


def stand_in(data: ImageData, size: int, classes: int | None = None) -> ImageData:
    """``size`` images repeating ``data``'s, labelled as theirs or (``classes``) ``i % classes``."""
    index = torch.arange(size) % len(data.images)
    if classes is None:
        return ImageData(data.images[index], data.labels[index], data.class_names)
    return ImageData(data.images[index], torch.arange(size) % classes, [f"class{c}" for c in range(classes)])


def paper_config(args: argparse.Namespace) -> StudyConfig:
    """``paper.yaml`` with each phase shortened as the options say (and tiny for ``--dry-run``)."""
    config = StudyConfig.from_dict(load_yaml(args.config))
    pretrain = dataclasses.replace(config.pretrain, epochs_per_layer=tuple(
        e * args.pretrain_fraction for e in config.pretrain.epochs_per_layer))
    if args.dry_run:
        pretrain = dataclasses.replace(pretrain, arch=ArchConfig(widths=(8,), kernel_sizes=(6,)),
                                       steps_per_layer=(2,), batch_size=32)
    shrink = {"new_widths": (8,), "hidden": 16, "batch_size": 32} if args.dry_run else {}
    return dataclasses.replace(
        config, pretrain=pretrain, seeds=tuple(args.seeds or config.seeds),
        supervised=dataclasses.replace(config.supervised, epochs=args.supervised_epochs,
                                       **{k: v for k, v in shrink.items() if k == "batch_size"}),
        transfer=dataclasses.replace(config.transfer, epochs=args.transfer_epochs, **shrink))


def paper_timing(full: StudyConfig, config: StudyConfig, data: StudyData, out_dir: Path, device: str,
                 ensemble: int) -> dict:
    """Times of each phase of the shortened study ``config`` and the projection to ``full``."""
    study = Study(config, out_dir, device, progress=False, ensemble=ensemble)
    study.setup = {"source_train": len(data.source), "source_test": len(data.source_test),
                   "target_train": len(data.target), "target_test": len(data.target_test),
                   "classes": data.target.class_names}
    phases = {}
    for init in config.inits:
        start = _now(device)
        for seed in config.seeds:
            study._init(init, seed, data.source, data.source_test, data.target)
        phases[init] = _now(device) - start
    start = _now(device)
    records = study.run(data)
    transfer_s = _now(device) - start
    one = dataclasses.replace(config.transfer, mode="finetune", layers=config.layers[0], epochs=1)
    net = study._init(config.inits[0], config.seeds[0], data.source, data.source_test, data.target)
    start = _now(device)
    train_transfer(net, data.target, data.target_test, one, device)
    separate_epoch_s = _now(device) - start
    runs = sum(r["mode"] in ("frozen", "finetune") for r in records)
    scale = {"pretrain": full.pretrain.epochs_per_layer[0] / config.pretrain.epochs_per_layer[0],
             "supervised": full.supervised.epochs / config.supervised.epochs,
             "transfer": full.transfer.epochs / config.transfer.epochs}
    projected = (sum(s * scale["supervised" if init == "supervised" else "pretrain"]
                     for init, s in phases.items() if init != "random") + transfer_s * scale["transfer"])
    return {"sizes": dict(study.setup, classes=len(data.target.class_names)), "ensemble": ensemble,
            "measured": {"init_s": phases, "transfer_s": transfer_s, "transfer_runs": runs,
                         "transfer_epochs": config.transfer.epochs, "separate_run_epoch_s": separate_epoch_s},
            "scale": scale, "projected_s": projected,
            "ensemble_speedup": separate_epoch_s * runs * config.transfer.epochs / transfer_s if transfer_s else None,
            "records": records}


def _now(device: str) -> float:
    if torch.cuda.is_available() and device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter()


def headline(result: dict) -> dict:
    """The figures the targets name, from the full result."""
    bench, paper = result.get("bench") or {}, result.get("paper") or {}
    race = bench.get("layerwise_vs_end2end") or {}
    layer1 = (bench.get("layers") or [{}])[0]
    return {"paper_projected_min": paper["projected_s"] / 60 if "projected_s" in paper else None,
            "pipeline_ratio": layer1.get("pipeline_ratio"),
            "layer1_fraction_of_matmul": layer1.get("fraction_of_matmul"),
            "race_time_ratio": race.get("ratio") if race.get("reached", True) else None,
            "ensemble_speedup": paper.get("ensemble_speedup")}


def verdicts(figures: dict) -> list[dict]:
    """Each target met or missed with its measured figure (None: not measured)."""
    rows = []
    for name, key, op, threshold in TARGETS:
        value = figures.get(key)
        met = None if value is None else (value <= threshold if op == "<=" else value >= threshold)
        rows.append({"target": f"{name} {op} {threshold:g}", "key": key, "measured": value, "met": met})
    return rows


def gpu_table(results: Sequence[dict]) -> str:
    """The markdown table of the GPU runs' targets, generated from their JSON (one column per run)."""
    head = ["target"] + [f"{r['env']['device']}, {r['env']['date'][:10]}" + (" (dry run)" if r.get("dry_run") else "")
                         for r in results]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, (name, key, op, threshold) in enumerate(TARGETS):
        cells = []
        for r in results:
            row = r["targets"][i]
            value = row["measured"]
            cells.append("not measured" if value is None else
                         f"{value:.3g} ({'met' if row['met'] else '**missed**'})")
        lines.append(f"| {name} {op} {threshold:g} | " + " | ".join(cells) + " |")
    cells = [f"{r['figures']['ensemble_speedup']:.2f}x" if r["figures"].get("ensemble_speedup") else "not measured"
             for r in results]
    lines.append("| transfer ensemble speed-up over separate runs (no target) | " + " | ".join(cells) + " |")
    versions = "; ".join(f"{r['env']['date'][:10]}: torch {r['env']['torch']}, CUDA {r['env']['cuda']}" for r in results)
    return "\n".join(lines + ["", f"Generated by `python experiments/gpu_check.py --table` ({versions})."])


def check(args: argparse.Namespace, say: Callable[[str], None]) -> dict:
    """Run every part of the check; returns the JSON's content."""
    device = "cpu" if args.dry_run else "cuda"
    result = {"env": environment(torch.device(device)), "dry_run": args.dry_run, "subset": str(args.subset)}
    start = time.perf_counter()
    if "tests" in args.parts:
        say("CUDA-only tests")
        result["tests"] = cuda_tests(args.tests, args.tests_timeout)
    train, test = load_subset(args.subset)
    if args.dry_run:
        train, test = balanced_limit(train, TINY["source"]), balanced_limit(test, TINY["test"])
    result["subset_sizes"] = {"train": len(train.images), "test": len(test.images)}
    if "bench" in args.parts:
        say("benchmark")
        result["bench"] = bench_figures(train, test, device, args.dry_run, say, args.race_batch)
    sizes = TINY if args.dry_run else FULL
    data = StudyData(stand_in(train, sizes["source"], 100), stand_in(test, sizes["test"], 100),
                     stand_in(train, sizes["target"]), stand_in(test, sizes["test"]))
    if "paper" in args.parts:
        say(f"paper.yaml timing on stand-ins of {sizes}")
        full = StudyConfig.from_dict(load_yaml(args.config))
        with tempfile.TemporaryDirectory() as tmp:
            result["paper"] = paper_timing(full, paper_config(args), data, Path(tmp), device, args.ensemble)
    result["seconds"] = time.perf_counter() - start
    result["figures"] = headline(result)
    result["targets"] = verdicts(result["figures"])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON (default docs/bench/gpu-<date>.json)")
    parser.add_argument("--subset", type=Path, default=DEFAULT_SUBSET, help="made by experiments/make_gpu_subset.py")
    parser.add_argument("--config", type=Path, default=PAPER)
    parser.add_argument("--pretrain-fraction", type=float, default=0.25)
    parser.add_argument("--supervised-epochs", type=int, default=1)
    parser.add_argument("--transfer-epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds of the timed study (default: the config's; the projection is for these)")
    parser.add_argument("--ensemble", type=int, default=9, help="transfer runs trained at once (default 9)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="what to run (default all; a rerun of one part within the GPU's time)")
    parser.add_argument("--race-batch", type=int, default=2048, help="the bench race's pretraining batch")
    parser.add_argument("--tests", nargs="+", default=["tests"], help="where the CUDA-only tests are looked for")
    parser.add_argument("--tests-timeout", type=float, default=180)
    parser.add_argument("--dry-run", action="store_true", help="the whole flow on the CPU at tiny sizes")
    parser.add_argument("--table", type=Path, nargs="+", default=None,
                        help="print the markdown table of these JSON files and stop")
    args = parser.parse_args(argv)
    if args.table:
        print(gpu_table([json.loads(p.read_text()) for p in args.table]))
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: needs a CUDA device (--dry-run runs the flow on the CPU at tiny sizes)", file=sys.stderr)
        return 2
    if not args.subset.is_file():
        print(f"gpu_check: no subset at {args.subset}: run experiments/make_gpu_subset.py first", file=sys.stderr)
        return 2
    began = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - began:5.0f} s] {message}", file=sys.stderr, flush=True)
    result = check(args, say)
    out = args.out or ROOT / "docs" / "bench" / f"gpu-{result['env']['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(gpu_table([result]))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
