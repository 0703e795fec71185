import json
from pathlib import Path

import pytest

from contrastive_lw.cli import main
from contrastive_lw.config import load_yaml
from contrastive_lw.errors import ConfigError
from contrastive_lw.study import StudyConfig

CONFIGS = Path(__file__).resolve().parent.parent / "experiments" / "configs"

TINY = """
source: {dataset: sample, classes: "0-1", limit: 24}
target: {dataset: sample, classes: "2-3", limit: 24}
pretrain: {arch: {widths: [4, 6]}, steps_per_layer: 2, batch_size: [16, 8]}
supervised: {epochs: 1, new_widths: [], hidden: 0, batch_size: 16}
transfer: {epochs: 2, new_widths: [8], hidden: 16, batch_size: 16}
inits: [layerwise, supervised, random]
modes: [frozen, finetune, linear, knn]
layers: [1, 2]
seeds: [0, 1]
"""


def test_compare_writes_results_report_and_figures(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    out = tmp_path / "study"
    assert main(["compare", "--config", str(tmp_path / "tiny.yaml"), "--out", str(out), "--no-progress"]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) == 3 * 4 * 2 * 2
    assert all({"init", "mode", "layers", "seed", "test_acc", "best_epoch", "curve", "seconds"} <= set(r) for r in records)
    assert all(len(r["curve"]) == (1 if r["mode"] == "knn" else 2) for r in records)
    assert {r["layers"] for r in records if r["mode"] == "knn"} == {1, 2}
    report = (out / "report.md").read_text()
    assert "| layerwise | finetune | 2 |" in report and "± " in report and "Adam lr 0.001 (constant)" in report
    assert "2 steps per layer of batch 16 / 8;" in report
    for figure in ("filters.png", "units_block2.png", "finetune_curves.png", "comparison.png", "class_images.png"):
        assert (out / "figures" / figure).stat().st_size > 1000 and f"figures/{figure}" in report
    assert any((out / "seed0" / "transfer" / "layerwise-frozen-k1" / "tb").iterdir())
    # a second run resumes: nothing is retrained, the figures are redrawn from saved runs
    assert main(["compare", "--config", str(tmp_path / "tiny.yaml"), "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["records"] == records
    (out / "figures" / "comparison.png").unlink()
    assert main(["visualize", str(out)]) == 0
    assert (out / "figures" / "comparison.png").is_file()


def test_shipped_configs_are_valid_and_quick_yaml_alone_defines_the_default(tmp_path, monkeypatch):
    from contrastive_lw import study

    for name in ("quick.yaml", "cpu-full.yaml", "paper.yaml"):
        StudyConfig.from_dict(load_yaml(CONFIGS / name))
    seen = []

    def stop(self, data=None):
        seen.append(self.config)
        raise SystemExit(0)
    monkeypatch.setattr(study.Study, "load_data", stop)
    with pytest.raises(SystemExit):
        main(["compare", "--out", str(tmp_path / "s"), "--set", "seeds=[7]"])
    quick = StudyConfig.from_dict({**load_yaml(CONFIGS / "quick.yaml"), "seeds": [7]})
    assert seen == [quick] and quick != StudyConfig(seeds=(7,))  # the class defaults are not a copy of it


def test_study_configs_pretrain_with_the_measured_winner():
    """docs/STUDY.md's winner: InfoNCE, block 1 four times as long as block 2, transfer with a cosine lr."""
    import dataclasses

    from contrastive_lw.model import ArchConfig
    from contrastive_lw.pretrain import PretrainConfig

    full = StudyConfig.from_dict(load_yaml(CONFIGS / "cpu-full.yaml"))
    assert full.pretrain == dataclasses.replace(PretrainConfig(), arch=ArchConfig(widths=(64, 128)), joint_fraction=0)
    quick = StudyConfig.from_dict(load_yaml(CONFIGS / "quick.yaml"))
    assert quick.pretrain.loss.name == "infonce" and quick.pretrain.steps_per_layer == (1600, 400)
    assert quick.pretrain.joint_fraction == 0.25  # 100 steps after block 2's 400
    assert full.transfer.lr_schedule == quick.transfer.lr_schedule == "cosine"


def test_paper_config_follows_the_paper():
    paper = StudyConfig.from_dict(load_yaml(CONFIGS / "paper.yaml"))
    assert paper.pretrain.arch.widths[0] == 256 and paper.pretrain.arch.kernel_sizes[0] == 6
    assert paper.transfer.new_widths == (512,) and paper.transfer.hidden == 512
    assert paper.transfer.epochs == 100 and len(paper.seeds) == 3 and paper.source.dataset == "cifar100"
    assert paper.pretrain.joint_fraction == 0 and paper.pretrain.mode == "greedy"  # block by block, nothing after


def test_bad_study_configs():
    with pytest.raises(ConfigError, match="inits"):
        StudyConfig.from_dict({"inits": ["imagenet"]})
    with pytest.raises(ConfigError, match="layers"):
        StudyConfig.from_dict({"layers": [9]})


def test_missing_data_fails_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("source: {dataset: cifar10}\ntarget: {dataset: cifar10}\n")
    code = main(["compare", "--config", str(tmp_path / "c.yaml"), "--data-root", str(tmp_path / "none"),
                 "--out", str(tmp_path / "study")])
    assert code == 2 and "--download" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()
