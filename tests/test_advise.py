import dataclasses
import json

import numpy as np
import pytest

from contrastive_lw.advise import (AdviceRules, Recommendation, halving_plan, neighbours, read_advice, recommend)
from contrastive_lw.cli import main
from contrastive_lw.errors import ConfigError
from contrastive_lw.fit import BlockFit


def _row(block, linear, random, kept=0.25, logme=0.0, held_out=10 ** 6):
    return BlockFit(block, knn=linear, knn_random=random, linear=linear, linear_random=random, logme=logme,
                    logme_random=0.0, head2toe_kept=kept, held_out=held_out)


def _measured(block, knn, knn_random, linear, linear_random, held_out=200):
    return BlockFit(block, knn=knn, knn_random=knn_random, linear=linear, linear_random=linear_random, logme=0.0,
                    logme_random=0.0, head2toe_kept=0.25, held_out=held_out)


def test_rules_pick_the_best_block_that_beats_random_and_scale_the_knobs_by_its_gain():
    strong = [_row(1, 0.60, 0.45), _row(2, 0.70, 0.50), _row(3, 0.55, 0.54)]
    rec = recommend(strong, per_class=5000)
    assert (rec.layers, rec.mode, rec.reinit) == (2, "finetune", 1)
    assert rec.lr_ratios == {"head": 1.0, "reinit": 1.0, "transferred": 0.1} and rec.l2sp == 0.01 and rec.l2 == 5e-4
    assert set(rec.to_json()) >= {"layers", "mode", "lr_ratios", "l2sp", "l2"}
    assert all(v["reason"] and "\n" not in v["reason"] for v in rec.to_json().values())
    assert recommend(strong, per_class=50).mode == "frozen"  # strong fit, little data
    weak = recommend([_row(1, 0.50, 0.47), _row(2, 0.50, 0.49)], per_class=5000)
    assert (weak.layers, weak.lr_ratios["transferred"], weak.l2sp) == (1, 0.5, 0.001)
    none = recommend([_row(1, 0.50, 0.50), _row(2, 0.40, 0.45)], per_class=5000)
    assert (none.layers, none.reinit, none.lr_ratios["transferred"], none.l2sp) == (1, 1, 1.0, 0.0)
    spread = recommend([_row(1, 0.60, 0.45, kept=0.6), _row(2, 0.70, 0.50, kept=0.1)], per_class=5000)
    assert spread.mode == "head2toe" and spread.l2sp == 0.0
    spread = recommend([_row(1, 0.60, 0.45, kept=0.6), _row(2, 0.70, 0.50, kept=0.1), _row(3, 0.5, 0.5)], 5000,
                       AdviceRules(reinit_rest=True))
    assert spread.reinit == 0  # head2toe reads features; nothing to re-initialise


def test_the_rule_table_is_tunable():
    table = [_row(1, 0.60, 0.45), _row(2, 0.70, 0.50), _row(3, 0.55, 0.54)]
    rec = recommend(table, 5000, AdviceRules(min_gain=0.0, depth_measure="knn", reinit_rest=False, l2sp_strong=0.5))
    assert (rec.layers, rec.reinit, rec.l2sp) == (2, 0, 0.5)
    knn_only = [_measured(1, 0.6, 0.4, 0.67, 0.67, held_out=10 ** 6)]  # a random block's probe is strong; its kNN not
    assert recommend(knn_only, 5000).l2sp == 0.01
    assert recommend(knn_only, 5000, AdviceRules(gain_measure="linear")).l2sp == 0.0
    with pytest.raises(ConfigError, match="depth_measure"):
        AdviceRules.from_dict({"depth_measure": "accuracy"})
    with pytest.raises(ConfigError, match="gain_se"):
        AdviceRules.from_dict({"gain_se": -1})


def test_a_gain_counts_only_above_its_standard_errors():
    """The same 4.5-point kNN gain is noise on 200 held-out images (s.e. ~5 points) and a fit on 20 000."""
    noisy = [_measured(1, 0.475, 0.475, 0.655, 0.67), _measured(2, 0.50, 0.455, 0.655, 0.65)]
    assert noisy[1].gain_z() == pytest.approx(0.045 / noisy[1].gain_se()) and 0.8 < noisy[1].gain_z() < 1
    rec = recommend(noisy, per_class=200)
    assert (rec.layers, rec.reinit, rec.lr_ratios["transferred"], rec.l2sp) == (1, 1, 1.0, 0.0)
    assert "+0.9 s.e." in rec.reasons["layers"] and "200 held-out" in rec.reasons["layers"]
    precise = [dataclasses.replace(r, held_out=20000) for r in noisy]
    assert precise[1].gain_z() > 8
    assert (recommend(precise, 200).layers, recommend(precise, 200).l2sp) == (2, 0.001)
    assert recommend(noisy, 200, AdviceRules(gain_se=0.0)).layers == 2  # the factor is the rule table's


def test_the_first_validation_measures_give_the_grid_best_cells():
    """docs/STUDY.md's first validation (classes 5-9, 200 held-out images): the layer-wise init's
    block 2 (+18 kNN points, 3.7 s.e.) fits strongly; the random init fits nowhere, so its advice is
    the grid's best cell for it (1 block, 1 re-initialised, all at the head's rate, no L2-SP) and
    no longer k=2 fine-tuned at half rate (54.4% vs 64.2%)."""
    layerwise = recommend([_measured(1, 0.505, 0.41, 0.67, 0.67), _measured(2, 0.59, 0.41, 0.69, 0.67)], 200)
    assert layerwise.transfer_values() == {"layers": 2, "mode": "finetune", "reinit": 0, "layer_lr_ratio": 0.1,
                                           "reinit_lr_ratio": 1.0, "l2sp": 0.01, "l2": 5e-4}
    assert "+3.7 s.e." in layerwise.reasons["layers"]
    random = recommend([_measured(1, 0.475, 0.475, 0.655, 0.67), _measured(2, 0.50, 0.455, 0.655, 0.65)], 200)
    assert random.transfer_values() == {"layers": 1, "mode": "finetune", "reinit": 1, "layer_lr_ratio": 1.0,
                                        "reinit_lr_ratio": 1.0, "l2sp": 0.0, "l2": 5e-4}
    assert all("s.e." in random.reasons[k] for k in ("layers",))
    assert "no fit" in random.reasons["lr_ratios"]


def test_neighbours_and_halving_plan():
    rec = recommend([_row(1, 0.60, 0.45), _row(2, 0.70, 0.50), _row(3, 0.55, 0.54)], 5000)
    around = neighbours(rec, 3)
    assert rec.key() in {c.key() for c in around} and len({c.key() for c in around}) == len(around)
    assert {c.layers for c in around} == {1, 2, 3}
    assert all(c.l2sp == 0 for c in around if c.mode == "frozen")
    assert halving_plan(1) == (1, 1) and halving_plan(12) == (4, 3) and halving_plan(31) == (4, 3)
    with pytest.raises(ConfigError, match="budget"):
        halving_plan(0)


@pytest.fixture
def npz(tmp_path, images):
    """Four brightness-coded classes (learnable), and a one-class and an unlabelled copy."""
    labels = np.arange(len(images)) % 4
    x = images.numpy().copy()
    x = (x // 2 + (labels * 40)[:, None, None, None]).astype(np.uint8)
    paths = {}
    for name, extra in {"good": {"labels": labels}, "one": {"labels": np.zeros_like(labels)}, "none": {}}.items():
        paths[name] = tmp_path / f"{name}.npz"
        np.savez(paths[name], images=x, **extra)
    return paths


@pytest.fixture
def run_dir(tmp_path, npz):
    out = tmp_path / "run"
    assert main(["pretrain", "--dataset", f"npz:{npz['good']}", "--widths", "4,6", "--steps-per-layer", "2",
                 "--batch-size", "8", "--no-progress", "--out", str(out)]) == 0
    return out


def _advise(run_dir, data, out, *extra):
    return main(["advise", "--init", str(run_dir), "--dataset", f"npz:{data}", "--out", str(out), *extra])


def test_advise_writes_measures_and_a_recommendation_that_transfer_applies(tmp_path, npz, run_dir, capsys):
    out = tmp_path / "advice.json"
    assert _advise(run_dir, npz["good"], out, "--held-out", "0.25") == 0
    advice = json.loads(out.read_text())
    assert [m["block"] for m in advice["measures"]] == [1, 2]
    assert {"knn", "linear", "linear_random", "logme", "head2toe_kept"} <= set(advice["measures"][0])
    assert {"layers", "mode", "lr_ratios", "l2sp", "l2"} <= set(advice["recommendation"])
    assert advice["split"] == {"fit": 48, "held_out": 16, "seed": 0}
    assert "| block |" in capsys.readouterr().out
    rec = read_advice(out)
    config = tmp_path / "t.yaml"
    config.write_text("transfer: {epochs: 1, batch_size: 16, new_widths: [4], hidden: 8}\n")
    assert main(["transfer", "--init", str(run_dir), "--dataset", f"npz:{npz['good']}", "--advice", str(out),
                 "--config", str(config), "--out", str(tmp_path / "t")]) == 0
    saved = (tmp_path / "t" / "config.yaml").read_text()
    assert f"layers: {rec.layers}" in saved and f"mode: {rec.mode}" in saved


def test_advise_search_stays_within_its_budget(tmp_path, npz, run_dir):
    out, config = tmp_path / "advice.json", tmp_path / "c.yaml"
    config.write_text("transfer: {batch_size: 16, new_widths: [4], hidden: 8}\n")
    assert _advise(run_dir, npz["good"], out, "--search", "5", "--config", str(config)) == 0
    advice = json.loads(out.read_text())
    search = advice["search"]
    assert search["candidates"] == 2 and search["epochs_spent"] == 4 <= search["budget"]
    assert [len(r["candidates"]) for r in search["rounds"]] == [2, 1]
    assert advice["recommendation"] == search["winner"] and "advice" in advice
    Recommendation.from_json(advice["recommendation"])


def _error(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("contrastive-lw") and "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_advise_refuses_unlabelled_data(tmp_path, npz, run_dir, capsys):
    assert "no labels" in _error(capsys, _advise(run_dir, npz["none"], tmp_path / "a.json"))


def test_advise_refuses_a_single_class(tmp_path, npz, run_dir, capsys):
    assert "two target classes" in _error(capsys, _advise(run_dir, npz["one"], tmp_path / "a.json"))


def test_advise_refuses_blocks_beyond_the_backbone(tmp_path, npz, run_dir, capsys):
    assert "beyond the backbone" in _error(capsys, _advise(run_dir, npz["good"], tmp_path / "a.json", "--blocks", "3"))


def test_transfer_refuses_a_missing_or_bad_advice_file_and_reinit_beyond_the_backbone(tmp_path, npz, run_dir, capsys):
    base = ["transfer", "--init", str(run_dir), "--dataset", f"npz:{npz['good']}", "--epochs", "1"]
    assert "advise" in _error(capsys, main([*base, "--advice", str(tmp_path / "no.json"), "--out", str(tmp_path / "a")]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"recommendation": {"layers": 1}}))
    assert "not a recommendation" in _error(capsys, main([*base, "--advice", str(bad), "--out", str(tmp_path / "b")]))
    assert "--reinit" in _error(capsys, main([*base, "--reinit", "2", "--out", str(tmp_path / "c")]))


def test_the_shipped_rule_file_spells_out_the_defaults():
    from pathlib import Path

    from contrastive_lw.config import load_yaml

    path = Path(__file__).resolve().parent.parent / "experiments" / "configs" / "advise_rules.yaml"
    assert AdviceRules.from_dict(load_yaml(path)) == AdviceRules()
