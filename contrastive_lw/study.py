"""The transfer study behind ``contrastive-lw compare``: pretrain / train every initialisation on
the source data, transfer each to the target task in every mode and depth, over several seeds,
and write ``results.json``, ``report.md`` and ``figures/``."""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .checkpoint import write_atomic
from .config import from_dict, to_dict
from .data import ImageData, load_dataset
from .errors import ConfigError
from .evaluate import block_features, knn_accuracy
from .backbones import build_backbone
from .blocks import BlockNet
from .model import LayerwiseNet
from .pretrain import LayerwisePretrainer, PretrainConfig
from .runs import RunLogger
from .supervised import train_supervised
from .transfer import MODES, TransferConfig, TransferResult, load_init, train_transfer

INITS = ("layerwise", "end2end", "supervised", "random")
UNIT_IMAGE_MAX_SIDE = 25  # the report draws the units of the deepest block whose receptive field is this small
STUDY_MODES = (*MODES, "knn")


@dataclass(frozen=True)
class DataSpec:
    """One labelled dataset: ``load_dataset(dataset, split, data_root, classes, limit)``."""

    dataset: str = "sample"
    classes: str | None = None
    limit: int | None = None

    def load(self, split: str, data_root: str | None, download: bool = False) -> ImageData:
        return load_dataset(self.dataset, split, data_root, self.classes, self.limit, download)


DEFAULT_STUDY = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "quick.yaml"  # in the checkout


@dataclass(frozen=True)
class StudyConfig:
    """The grid: ``inits`` x ``modes`` x ``layers`` (blocks transferred) x ``seeds``. Modes are the
    transfer modes plus ``knn``: kNN accuracy of block k's features, nothing trained.

    Unset sections take the components' own defaults; the default study of ``compare`` is
    :data:`DEFAULT_STUDY`, ``experiments/configs/quick.yaml``, its only definition."""

    source: DataSpec = field(default_factory=DataSpec)
    target: DataSpec = field(default_factory=DataSpec)
    data_root: str | None = None
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    supervised: TransferConfig = field(default_factory=TransferConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    inits: tuple[str, ...] = ("layerwise", "supervised", "random")
    modes: tuple[str, ...] = ("frozen", "finetune", "linear", "knn")
    layers: tuple[int, ...] = (1, 2)
    seeds: tuple[int, ...] = (0, 1)

    def __post_init__(self) -> None:
        bad = [i for i in self.inits if i not in INITS] + [m for m in self.modes if m not in STUDY_MODES]
        if bad or not (self.inits and self.modes and self.layers and self.seeds):
            raise ConfigError(f"study needs inits among {list(INITS)}, modes among {list(STUDY_MODES)}, "
                              f"layers and seeds; got {bad or 'an empty list'}")
        blocks = self.pretrain.backbone.num_blocks(self.pretrain.arch)
        if max(self.layers) > blocks or min(self.layers) < 1:
            raise ConfigError(f"layers {list(self.layers)} must lie in 1..{blocks} (the pretrained blocks)")

    @classmethod
    def from_dict(cls, values: dict) -> StudyConfig:
        return from_dict(cls, values, "study config")


class StudyData(NamedTuple):
    source: ImageData
    source_test: ImageData
    target: ImageData
    target_test: ImageData


class Study:
    """Runs (and resumes) a :class:`StudyConfig` in ``out_dir``: finished records in
    ``results.json`` and finished pretraining runs are reused when run again."""

    def __init__(self, config: StudyConfig, out_dir: str | Path, device: str = "auto",
                 progress: bool | None = None, download: bool = False, ensemble: int = 1) -> None:
        self.config, self.out_dir = config, Path(out_dir)
        self.device, self.progress, self.download = device, progress, download
        self.ensemble = ensemble  # > 1: frozen / finetune runs train up to this many at once (ensemble.py)

    def load_data(self) -> StudyData:
        """The four splits of the study (fails early, before anything is written, if data is missing)."""
        cfg = self.config
        data = StudyData(*(spec.load(split, cfg.data_root, self.download)
                           for spec in (cfg.source, cfg.target) for split in ("train", "test")))
        self.setup = {"source_train": len(data.source), "source_test": len(data.source_test),
                      "target_train": len(data.target), "target_test": len(data.target_test),
                      "classes": data.target.class_names, "image_shape": list(data.target.images.shape[1:])}
        return data

    def run(self, data: StudyData | None = None) -> list[dict]:
        """Run every missing cell of the grid; returns all records."""
        cfg = self.config
        source, source_test, target, target_test = data or self.load_data()
        records = self.load_records()
        done = {_key(r) for r in records}
        if self.ensemble > 1:
            from .ensemble import run_study_ensembles

            run_study_ensembles(self, records, StudyData(source, source_test, target, target_test), self.ensemble)
            done = {_key(r) for r in records}
        grid = [(s, i, m, k) for s in cfg.seeds for i in cfg.inits for m in cfg.modes for k in cfg.layers]
        for seed, init, mode, k in tqdm(grid, desc="study", disable=None if self.progress is None else not self.progress):
            if (init, mode, k, seed) in done:
                continue
            net = self._init(init, seed, source, source_test, target)
            if mode == "knn":
                result = knn_result(net, k, target, target_test, cfg.transfer.pool)
            else:
                transfer = dataclasses.replace(cfg.transfer, mode=mode, layers=k, seed=seed)
                run_dir = self.out_dir / f"seed{seed}" / "transfer" / f"{init}-{mode}-k{k}"
                with RunLogger(run_dir) as logger:
                    result, _ = train_transfer(net, target, target_test, transfer, self.device, logger,
                                               run_dir / "state.pt")
            records.append({"init": init, "mode": mode, "layers": k, "seed": seed, **dataclasses.asdict(result)})
            self._write(records)
        write_report(self.out_dir, records, self.setup_text())
        return records

    def _init(self, init: str, seed: int, source: ImageData, source_test: ImageData,
              target: ImageData) -> BlockNet:
        """The network ``init`` starts from for ``seed``, trained once and kept on disk."""
        cfg, run_dir = self.config, self.out_dir / f"seed{seed}" / init
        if init == "random":
            torch.manual_seed(seed)
            return load_init("random", target.images, cfg.pretrain.arch, cfg.pretrain.backbone)[1]
        if not any(run_dir.glob("layer*.pt")):
            if init == "supervised":
                train_supervised(source, source_test, cfg.pretrain.arch, dataclasses.replace(cfg.supervised, seed=seed),
                                 run_dir, self.device, backbone=cfg.pretrain.backbone, init_scale=cfg.pretrain.init_scale)
            else:
                mode = "greedy" if init == "layerwise" else "end2end"
                pretrain = dataclasses.replace(cfg.pretrain, mode=mode, seed=seed)
                LayerwisePretrainer(pretrain, run_dir, self.device, self.progress).fit(source.images)
        return load_init(run_dir, target.images)[1]

    def load_records(self) -> list[dict]:
        path = self.out_dir / "results.json"
        return json.loads(path.read_text())["records"] if path.exists() else []

    def _write(self, records: list[dict]) -> None:
        text = json.dumps({"config": to_dict(self.config), "setup": self.setup, "records": records}, indent=1)
        write_atomic(self.out_dir / "results.json", lambda f: f.write(text.encode()))

    def setup_text(self) -> str:
        cfg, setup = self.config, self.setup
        backbone, blocks = cfg.pretrain.backbone, cfg.pretrain.backbone.num_blocks(cfg.pretrain.arch)
        shape = (f"Block widths {', '.join(map(str, cfg.pretrain.arch.widths))}" if backbone.name == "lw" else
                 f"Backbone {backbone.name}{' (CIFAR stem)' if backbone.cifar_stem else ''}, weights "
                 f"{backbone.weights}, {blocks} blocks")
        steps = [cfg.pretrain.steps(setup["source_train"], k) for k in range(1, blocks + 1)]
        batches = [cfg.pretrain.layer_batch_size(k) for k in range(1, blocks + 1)]
        steps_text, batch_text = (str(v[0]) if len(set(v)) == 1 else " / ".join(map(str, v)) for v in (steps, batches))
        return (f"source (pretraining, supervised baseline): `{cfg.source.dataset}` classes {cfg.source.classes or 'all'}, "
                f"{setup['source_train']} train images; target: `{cfg.target.dataset}` classes "
                f"{cfg.target.classes or 'all'} ({', '.join(setup['classes'])}), {setup['target_train']} train / "
                f"{setup['target_test']} test images. {shape}; pretraining "
                f"{cfg.pretrain.loss.name} loss, {steps_text} steps per layer of "
                f"batch {batch_text}; supervised baseline {cfg.supervised.epochs} epochs; transfer "
                f"{cfg.transfer.epochs} epochs, Adam lr {cfg.transfer.lr} ({cfg.transfer.lr_schedule}), "
                f"new blocks {list(cfg.transfer.new_widths)}, "
                f"fc {cfg.transfer.hidden}; seeds {list(cfg.seeds)}.")


def knn_result(net: BlockNet, k: int, target: ImageData, target_test: ImageData, pool: int) -> TransferResult:
    """kNN accuracy (lightly's ``knn_predict``) of block ``k``'s pooled features, as a record."""
    start = time.perf_counter()
    accuracy = knn_accuracy(block_features(net, target.images, k, pool), target.labels,
                            block_features(net, target_test.images, k, pool), target_test.labels)
    return TransferResult(accuracy, [accuracy], 1, time.perf_counter() - start)


def _key(record: dict) -> tuple:
    return record["init"], record["mode"], record["layers"], record["seed"]


def summarize(records: list[dict]) -> dict[tuple[str, str, int], tuple[float, float, int]]:
    """(init, mode, layers) -> (mean test accuracy, std over seeds, number of seeds)."""
    groups: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in records:
        groups[r["init"], r["mode"], r["layers"]].append(r["test_acc"])
    return {key: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
            for key, v in sorted(groups.items())}


def write_report(out_dir: str | Path, records: list[dict], setup: str = "") -> Path:
    """``report.md`` (table of mean ± std over seeds, setup, figures) and ``figures/`` from records."""
    out_dir = Path(out_dir)
    figures = write_figures(out_dir, records)
    summary = summarize(records)
    lines = ["# Transfer study", "", setup, "",
             "| init | mode | layers | test accuracy (%) | seeds | minutes per run |", "|---|---|---|---|---|---|"]
    minutes = defaultdict(list)
    for r in records:
        minutes[r["init"], r["mode"], r["layers"]].append(r["seconds"] / 60)
    for (init, mode, k), (mean, std, n) in summary.items():
        lines.append(f"| {init} | {mode} | {k} | {100 * mean:.1f} ± {100 * std:.1f} | {n} | "
                     f"{statistics.mean(minutes[init, mode, k]):.1f} |")
    lines += ["", *[f"![{p.stem}](figures/{p.name})" for p in figures], ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_figures(out_dir: Path, records: list[dict]) -> list[Path]:
    """Filter grids and the deepest shared block's units (unsupervised vs supervised, activation
    maximisation), fine-tuning curves, the bar chart of the grid, the features Head2Toe kept per layer
    (the deepest head2toe cells of the first seed, one series per init)."""
    from .checkpoint import load_backbone
    from .visualize import maximize_activation, save_bar_chart, save_curves, save_filter_grids, save_kept_features

    figures = out_dir / "figures"
    written = []
    seed = min((r["seed"] for r in records), default=0)
    backbones = {init: load_backbone(out_dir / f"seed{seed}" / init) for init in ("layerwise", "end2end", "supervised")
                 if any((out_dir / f"seed{seed}" / init).glob("layer*.pt"))}
    if backbones:
        written.append(save_filter_grids({f"{init} block 1": net.first_conv().weight
                                          for init, net in backbones.items()}, figures / "filters.png",
                                         f"Seed {seed}. Every network shown started from the same initialisation "
                                         "(backbones.initial_backbone: the seed's draw, lw conv weights x init_scale); "
                                         "each filter is scaled to its own range."))
        deepest = min(net.num_blocks for net in backbones.values())
        first = next(iter(backbones.values()))
        while deepest > 1 and first.receptive_field(deepest) > UNIT_IMAGE_MAX_SIDE:
            deepest -= 1  # a torchvision stage's units see most of the image: too costly to ascend for a report
        if deepest > 1:
            count = 64 if isinstance(first, LayerwiseNet) else 16  # a torchvision stage costs ~50x an lw block
            units = {f"{init} block {deepest}": maximize_activation(net, deepest, units=count)
                     for init, net in backbones.items()}
            written.append(save_filter_grids(units, figures / f"units_block{deepest}.png"))
    finetune = [r for r in records if r["mode"] == "finetune"]
    if finetune:
        k = min(r["layers"] for r in finetune)
        curves = defaultdict(list)
        for r in finetune:
            if r["layers"] == k:
                curves[r["init"]].append(r["curve"])
        mean_curves = {f"{init} init": [statistics.mean(c) for c in zip(*cs)] for init, cs in curves.items()}
        written.append(save_curves(mean_curves, figures / "finetune_curves.png",
                                   f"fine-tuning {k} transferred block(s): test accuracy (mean over seeds)"))
    class_figure = class_image_figure(out_dir, records)
    if class_figure is not None:
        written.append(class_figure)
    groups: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
    for (init, mode, k), (mean, std, _) in summarize(records).items():
        groups[f"{mode}, {k} layer{'s' * (k > 1)}"][init] = (mean, std)
    if groups:
        written.append(save_bar_chart(groups, figures / "comparison.png", "target test accuracy by init, mode, depth"))
    head2toe = [r for r in records if r["mode"] == "head2toe" and r.get("head2toe_kept") and r["seed"] == seed]
    if head2toe:
        k = max(r["layers"] for r in head2toe)
        kept = {f"{r['init']} init": r["head2toe_kept"] for r in head2toe if r["layers"] == k}
        written.append(save_kept_features(kept, figures / "head2toe_kept.png",
                                          f"Head2Toe on {k} block(s): features kept per layer (seed {seed})"))
    return written


def class_image_figure(out_dir: Path, records: list[dict], steps: int = 200) -> Path | None:
    """``figures/class_images.png``: the ideal class images (:func:`~contrastive_lw.visualize.class_images`)
    of each init's fine-tuned classifier (else its frozen one) of the most blocks, first seed, one
    row per init; None when no such run left a ``state.pt`` (or there is no results.json, or it predates image_shape)."""
    from .attack import classifier_from_state
    from .checkpoint import load_checkpoint
    from .transfer import TRANSFER_STATE
    from .visualize import save_class_image_grid

    path = out_dir / "results.json"
    saved = json.loads(path.read_text()) if path.is_file() else {"setup": {}}
    runs = [r for mode in ("finetune", "frozen") for r in records if r["mode"] == mode]
    if not runs or "image_shape" not in saved["setup"]:
        return None
    mode = runs[0]["mode"]
    seed, k = min(r["seed"] for r in runs if r["mode"] == mode), max(r["layers"] for r in runs if r["mode"] == mode)
    pretrain, setup = StudyConfig.from_dict(saved["config"]).pretrain, saved["setup"]
    models = {}
    for init in dict.fromkeys(r["init"] for r in runs if (r["mode"], r["seed"], r["layers"]) == (mode, seed, k)):
        path = out_dir / f"seed{seed}" / "transfer" / f"{init}-{mode}-k{k}" / "state.pt"
        if path.is_file():  # ensemble runs keep no state.pt
            state = load_checkpoint(path, TRANSFER_STATE)
            models[f"{init}, {mode} {k}"] = classifier_from_state(
                build_backbone(pretrain.backbone, pretrain.arch), TransferConfig.from_dict(state["config"]), state["model"],
                len(setup["classes"]), setup["image_shape"][-1])
    if not models:
        return None
    return save_class_image_grid(models, setup["classes"], setup["image_shape"],
                                 out_dir / "figures" / "class_images.png", steps)
