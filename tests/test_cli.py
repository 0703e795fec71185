import subprocess
import sys

import numpy as np
import pytest
import yaml

from contrastive_lw.cli import main


@pytest.fixture
def npz(write_npz):
    return write_npz(classes=4)


def _pretrain(npz, out, *extra):
    return main(["pretrain", "--dataset", f"npz:{npz}", "--widths", "4,4", "--steps-per-layer", "2",
                 "--batch-size", "8", "--no-progress", "--out", str(out), *extra])


def test_pretrain_command_writes_a_run(tmp_path, npz):
    out = tmp_path / "run"
    assert _pretrain(npz, out, "--layers", "2") == 0
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "layer1.pt", "layer2.pt", "metrics.jsonl",
                                                "tb", "filters_layer1.png"}


def test_pretrain_steps_per_layer_per_layer(tmp_path, npz):
    import torch

    out = tmp_path / "run"
    assert _pretrain(npz, out, "--steps-per-layer", "3,1") == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["pretrain"]["steps_per_layer"] == [3, 1]
    assert [torch.load(out / f"layer{k}.pt", weights_only=True)["metrics"]["steps"] for k in (1, 2)] == [3, 1]


def test_pretrain_joint_fraction_flag_sets_the_joint_pass(tmp_path, npz):
    import torch

    out = tmp_path / "run"
    assert _pretrain(npz, out, "--steps-per-layer", "2,4", "--joint-fraction", "1.5") == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["pretrain"]["joint_fraction"] == 1.5
    assert torch.load(out / "layer2.pt", weights_only=True)["metrics"]["joint_steps"] == 6  # 1.5 x layer 2's 4
    assert _pretrain(npz, tmp_path / "greedy", "--joint-fraction", "0") == 0
    assert "joint_steps" not in torch.load(tmp_path / "greedy" / "layer2.pt", weights_only=True)["metrics"]


def test_pretrain_negative_flag_reaches_the_config(tmp_path, npz):
    out = tmp_path / "run"
    assert _pretrain(npz, out, "--layers", "1", "--negative", "same_image") == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["pretrain"]["negative"] == "same_image"


def test_plain_pretrain_defaults_are_the_ablations_winner_and_the_paper_stays_reachable():
    import argparse

    from contrastive_lw.commands.pretrain import add_arguments, pretrain_settings
    from contrastive_lw.pretrain import PretrainConfig

    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def config(*flags):
        return PretrainConfig.from_dict(pretrain_settings(parser.parse_args(["--out", "x", *flags]), None))
    plain = config("--layers", "3")
    assert (plain.loss.name, plain.lr, plain.positives) == ("infonce", 0.003, ("adjacent", "exemplar"))
    assert [plain.steps(25_000, k) for k in (1, 2, 3)] == [3128, 782, 800]
    assert (plain.joint_fraction, plain.joint_lr) == (0.25, 0.001)  # then blocks 1-3 together, 200 steps
    assert plain.arch.pools == (2, 2, 1)  # block 3 unpooled
    assert config("--layers", "3", "--no-pool1").arch.pools == (1, 2, 1)  # the paper's ablation: block 1 alone
    assert [plain.layer_batch_size(k) for k in (1, 2, 3)] == [512, 512, 128]
    assert [plain.layer_augment(k).crop_scale for k in (1, 2, 3)] == [(1.0, 1.0), (0.2, 1.0), (0.2, 1.0)]
    paper = config("--layers", "3", "--loss", "triplet", "--lr", "0.001")
    assert (paper.loss.name, paper.loss.distance, paper.loss.margin, paper.loss.mining, paper.negative) == (
        "triplet", "cosine", 0.5, "none", "other_image")
    assert config("--loss", "triplet", "--mining", "all").loss.mining == "all"
    assert (paper.loss.soft_margin, config("--loss", "triplet", "--soft-margin", "8").loss.soft_margin) == (0.0, 8.0)
    assert [config("--epochs-per-layer", "2").steps(25_000, k) for k in (1, 3)] == [1564, 6250]  # block 3: batch 128
    assert [config("--epochs-per-layer", "4,0.5").steps(25_000, k) for k in (1, 2, 3)] == [3128, 391, 1563]
    assert config("--batch-size", "256").batch_size == (256,)
    assert config("--batch-size", "512,64").batch_size == (512, 64)


def test_flag_choices_are_the_librarys_options():
    """The commands spell their choices out (importing the library would import torch for --help):
    they must stay the options the configs accept."""
    import argparse

    from contrastive_lw import losses, patches, pretrain, transfer
    from contrastive_lw.commands import pretrain as pretrain_command, transfer as transfer_command

    def choices(command):
        parser = argparse.ArgumentParser()
        command.add_arguments(parser)
        return {a.option_strings[0]: tuple(a.choices) for a in parser._actions if a.choices and a.option_strings}
    ours = choices(pretrain_command)
    assert (ours["--mode"], ours["--loss"], ours["--mining"], ours["--distance"], ours["--negative"]) == (
        pretrain.MODES, losses.LOSSES, losses.MINING, losses.DISTANCES, patches.NEGATIVES)
    ours = choices(transfer_command)
    assert (ours["--mode"], ours["--lr-schedule"]) == (transfer.MODES, transfer.LR_SCHEDULES)


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "contrastive_lw", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "pretrain" in result.stdout


def _error(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("contrastive-lw") and "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_unknown_dataset(tmp_path, capsys):
    err = _error(capsys, main(["pretrain", "--dataset", "imagenet42", "--out", str(tmp_path / "r")]))
    assert "imagenet42" in err


def test_missing_dataset_names_the_fix(tmp_path, capsys):
    err = _error(capsys, main(["pretrain", "--dataset", "cifar10", "--data-root", str(tmp_path / "empty"),
                               "--out", str(tmp_path / "r")]))
    assert "--download" in err and "--data-root" in err


def test_layers_out_of_range(tmp_path, npz, capsys):
    assert "--layers" in _error(capsys, _pretrain(npz, tmp_path / "r", "--layers", "0"))
    assert "--layers" in _error(capsys, _pretrain(npz, tmp_path / "r", "--layers", "3"))


def test_patch_larger_than_images(tmp_path, capsys):
    small = tmp_path / "small.npz"
    np.savez(small, images=np.zeros((4, 12, 12, 3), np.uint8))
    err = _error(capsys, main(["pretrain", "--dataset", f"npz:{small}", "--positive", "exemplar",
                               "--out", str(tmp_path / "r")]))
    assert "larger than the 12x12 images" in err


def test_out_is_a_file(tmp_path, npz, capsys):
    (tmp_path / "file").write_text("x")
    assert "is a file" in _error(capsys, _pretrain(npz, tmp_path / "file"))


def test_resume_with_another_config_needs_force(tmp_path, npz, capsys):
    assert _pretrain(npz, tmp_path / "r", "--layers", "1") == 0
    assert "--force" in _error(capsys, _pretrain(npz, tmp_path / "r", "--layers", "1", "--lr", "0.01"))


def test_config_file_errors(tmp_path, npz, capsys):
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("pretrain:\n  lerning_rate: 0.1\n")
    assert "lerning_rate" in _error(capsys, _pretrain(npz, tmp_path / "r", "--config", str(bad_key)))
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("pretrain: [unclosed\n")
    assert "malformed YAML" in _error(capsys, _pretrain(npz, tmp_path / "r", "--config", str(malformed)))


def test_set_overrides_any_setting_of_the_config_file(tmp_path, npz, capsys):
    """``--set SECTION.KEY=VALUE`` reaches fields that have no flag, on top of --config; flags win."""
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text("pretrain:\n  loss: {name: infonce, temperature: 0.5}\n  lr: 0.01\n")
    assert _pretrain(npz, tmp_path / "r", "--config", str(config), "--set", "pretrain.loss.temperature=0.2",
                     "--set", "pretrain.embed_dim=16", "--set", "pretrain.lr=0.5", "--lr", "0.002") == 0
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["pretrain"]
    assert (saved["loss"]["temperature"], saved["loss"]["name"], saved["embed_dim"], saved["lr"]) == (0.2, "infonce", 16, 0.002)
    assert "lerning_rate" in _error(capsys, _pretrain(npz, tmp_path / "x", "--set", "pretrain.lerning_rate=1"))
    assert "SECTION.KEY=VALUE" in _error(capsys, _pretrain(npz, tmp_path / "x", "--set", "pretrain.lr"))
    assert "unknown section" in _error(capsys, _pretrain(npz, tmp_path / "x", "--set", "study.lr=1"))


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--lr", "-1"), ("--epochs-per-layer", "0")])
def test_non_positive_sizes_and_rates(tmp_path, npz, capsys, flag, value):
    assert flag.lstrip("-").replace("-", "_") in _error(capsys, _pretrain(npz, tmp_path / "r", flag, value))


def test_out_of_memory_says_lower_the_batch_size(tmp_path, npz, capsys, monkeypatch):
    import torch

    from contrastive_lw.pretrain import LayerwisePretrainer

    def oom(self, images):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(LayerwisePretrainer, "fit", oom)
    assert "--batch-size" in _error(capsys, _pretrain(npz, tmp_path / "r"))


def test_unavailable_device(tmp_path, npz, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA is not available" in _error(capsys, _pretrain(npz, tmp_path / "r", "--device", "cuda"))
    assert "unknown device" in _error(capsys, _pretrain(npz, tmp_path / "r2", "--device", "tpu9"))


def test_missing_config_file_limit_and_positive(tmp_path, npz, capsys):
    assert "does not exist" in _error(capsys, _pretrain(npz, tmp_path / "r", "--config", str(tmp_path / "no.yaml")))
    assert "--limit" in _error(capsys, _pretrain(npz, tmp_path / "r", "--limit", "0"))
    assert "positives" in _error(capsys, _pretrain(npz, tmp_path / "r", "--positive", "near"))


def test_a_failed_start_leaves_no_config_behind(tmp_path, npz, capsys):
    _error(capsys, main(["pretrain", "--dataset", "cifar10", "--data-root", str(tmp_path / "none"),
                         "--out", str(tmp_path / "r")]))
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_help_does_not_load_torch():
    code = ("import sys; from contrastive_lw.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_visualize_a_pretraining_run_and_an_empty_dir(tmp_path, npz, capsys):
    out = tmp_path / "run"
    assert _pretrain(npz, out, "--layers", "2") == 0
    (out / "filters_layer1.png").unlink()
    assert main(["visualize", str(out), "--units", "8"]) == 0 and (out / "filters_layer1.png").stat().st_size > 0
    assert all((out / f"units_layer{k}.png").stat().st_size > 0 for k in (1, 2))
    (tmp_path / "empty").mkdir()
    assert "neither results.json" in _error(capsys, main(["visualize", str(tmp_path / "empty")]))


def test_supervised_takes_its_config_file_and_flags_override_it(tmp_path, npz):
    (tmp_path / "sup.yaml").write_text("data: {dataset: npz:" + str(npz) + "}\narch: {widths: [4, 6]}\n"
                                       "supervised: {epochs: 2, batch_size: 8, hidden: 16}\n")
    out = tmp_path / "sup"
    assert main(["supervised", "--config", str(tmp_path / "sup.yaml"), "--epochs", "1", "--no-progress",
                 "--out", str(out)]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["arch"]["widths"] == [4, 6] and saved["data"]["dataset"] == f"npz:{npz}"
    assert saved["supervised"]["epochs"] == 1 and saved["supervised"]["batch_size"] == 8   # flag > file > default
    assert saved["supervised"]["hidden"] == 16 and saved["supervised"]["new_widths"] == []


def test_supervised_config_with_an_unknown_section(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("pretrain: {lr: 0.1}\n")
    err = _error(capsys, main(["supervised", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "s")]))
    assert "unknown section(s) ['pretrain']" in err


def test_transfer_lr_schedule_flag_reaches_the_run(tmp_path, npz):
    out = tmp_path / "t"
    assert main(["transfer", "--init", "random", "--dataset", f"npz:{npz}", "--mode", "linear", "--layers", "1",
                 "--epochs", "2", "--lr-schedule", "cosine", "--device", "cpu", "--out", str(out)]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["transfer"]["lr_schedule"] == "cosine"
