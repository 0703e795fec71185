import json

import pytest
import torch
from torch import nn

from contrastive_lw.attack import fgsm, pgd, robustness
from contrastive_lw.cli import main
from contrastive_lw.errors import ConfigError

EPS = 8 / 255


@pytest.fixture(scope="module")
def trained():
    """A logistic regression on pixels that tells bright images from dark ones, and its data in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(128, 3, 1, 1, generator=g) * 0.6 + 0.2 + 0.1 * torch.rand(128, 3, 8, 8, generator=g)).clamp(0, 1)
    y = (x.mean(dim=(1, 2, 3)) > 0.5).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), x, y


def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_pgd_stays_in_the_ball_and_lowers_accuracy(trained):
    model, x, y = trained
    adv = pgd(model, x, y, EPS, generator=torch.Generator().manual_seed(1))
    assert (adv - x).abs().max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    clean = _accuracy(model, x, y)
    assert clean > 0.9 and _accuracy(model, adv, y) < clean - 0.2
    assert _accuracy(model, adv, y) <= _accuracy(model, fgsm(model, x, y, EPS), y) + 1e-6
    result = robustness(model, (x * 255).round().to(torch.uint8), y, [0.0, EPS], batch_size=50)
    assert result["pgd"][0.0] == result["clean"] and result["pgd"][EPS] < result["clean"]


def test_negative_epsilon_is_refused(trained, capsys):
    model, x, y = trained
    for attack in (fgsm, pgd):
        with pytest.raises(ConfigError, match="epsilon must be >= 0"):
            attack(model, x, y, -0.1)
    assert main(["attack", "no-such-run", "--eps", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--eps must be >= 0" in err and err.count("\n") == 1


def test_attack_needs_a_transfer_run(tmp_path, capsys):
    assert main(["attack", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a finished `contrastive-lw transfer` run" in err and err.count("\n") == 1


def test_matches_torchattacks(trained):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained
    ours = pgd(model, x, y, EPS, random_start=False)
    theirs = torchattacks.PGD(model, eps=EPS, alpha=2 / 255, steps=10, random_start=False)(x, y)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(fgsm(model, x, y, EPS), torchattacks.FGSM(model, eps=EPS)(x, y), atol=1e-6)


def test_attack_command_on_a_transfer_run(tmp_path, capsys):
    runs = []
    for seed in (0, 1):
        runs.append(str(tmp_path / f"linear{seed}"))
        assert main(["transfer", "--init", "random", "--dataset", "sample", "--classes", "0-1", "--limit", "40",
                     "--layers", "1", "--mode", "linear", "--epochs", "2", "--seed", str(seed), "--out", runs[-1],
                     "--no-progress", "--device", "cpu"]) == 0
    summary = tmp_path / "summary.json"
    assert main(["attack", *runs, "--eps", "0,4", "--images", "12", "--steps", "2", "--device", "cpu",
                 "--summary", str(summary)]) == 0
    tables = [json.loads((tmp_path / run / "attack" / "attack.json").read_text()) for run in runs]
    for seed, table in enumerate(tables):
        assert table["images"] == 12 and table["pgd"]["0/255"] == table["clean"] and "4/255" in table["fgsm"]
        assert list(table["per_class"].values()) == [6, 6]  # class-balanced, not the folder's first 12
        assert table["run"]["seed"] == seed and table["run"]["init"] == "random"
        assert (tmp_path / runs[seed] / "attack" / "attack_grid.png").stat().st_size > 0
    row, = json.loads(summary.read_text())["rows"]
    assert row["seeds"] == [0, 1] and row["runs"] == runs
    cleans = [t["clean"] for t in tables]
    assert row["clean"][0] == pytest.approx(sum(cleans) / 2) and row["clean"][1] == pytest.approx(
        abs(cleans[0] - cleans[1]) / 2 ** 0.5)
    printed = capsys.readouterr().out
    assert main(["attack", "--table", str(summary)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| init | mode, blocks | seeds |") and "| random | linear, 1 | 0, 1 |" in table
    assert table.strip() in printed and "PGD 4/255" in table


def test_attack_needs_a_run_and_table_a_summary_alone(tmp_path, capsys):
    assert main(["attack"]) == 2
    assert main(["attack", "run", "--table", str(tmp_path / "none.json")]) == 2
    assert main(["attack", "run1", "run2", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "at least one RUN" in err[0] and "--table prints a saved --summary file" in err[1]
    assert "--out names the output of a single RUN" in err[2] and len(err) == 3


def test_a_class_balanced_subset_of_a_folder_sorted_by_class(tmp_path):
    """The first N images of a folder are one class; the attacked ones take the classes in turn."""
    from contrastive_lw.attack import attack_run

    run = tmp_path / "frozen"
    assert main(["transfer", "--init", "random", "--dataset", "sample", "--classes", "0-2", "--layers", "1",
                 "--mode", "frozen", "--epochs", "1", "--out", str(run), "--no-progress", "--device", "cpu"]) == 0
    table, _, attacked = attack_run(run, [2 / 255], ["fgsm"], images=9)
    assert table["per_class"] == {name: 3 for name in attacked.class_names}
    assert attacked.labels.tolist() == sorted(attacked.labels.tolist())  # the folder's order is kept


def test_a_finetune_run_with_reinitialised_blocks_is_rebuilt_as_trained(tmp_path):
    """load_transfer_model rebuilds the classifier a run trained (re-initialised blocks included):
    its accuracy on the run's test images is the run's own."""
    from contrastive_lw.attack import load_transfer_model

    run = tmp_path / "ft"
    assert main(["transfer", "--init", "random", "--dataset", "sample", "--classes", "0-1", "--limit", "40",
                 "--layers", "1", "--reinit", "1", "--mode", "finetune", "--epochs", "1", "--out", str(run),
                 "--no-progress", "--device", "cpu"]) == 0
    model, test = load_transfer_model(run)
    with torch.no_grad():
        accuracy = float((model(test.images.float() / 255).argmax(1) == test.labels).float().mean())
    assert accuracy == pytest.approx(json.loads((run / "results.json").read_text())["records"][0]["test_acc"])


def test_the_grid_takes_the_classes_in_turn():
    from contrastive_lw.attack import classes_in_turn

    labels = torch.tensor([0, 0, 0, 1, 1, 2, 0, 2])
    assert classes_in_turn(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]), labels).tolist() == [0, 3, 5, 1, 4, 7, 2, 6]
    assert classes_in_turn(torch.tensor([6, 2, 4]), labels).tolist() == [6, 4, 2]
    assert classes_in_turn(torch.tensor([], dtype=torch.long), labels).tolist() == []
