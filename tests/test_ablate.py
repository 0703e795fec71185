import importlib.util
from pathlib import Path

import pytest
import torch

SPEC = importlib.util.spec_from_file_location("ablate", Path(__file__).parents[1] / "experiments" / "ablate.py")
ablate = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(ablate)


def test_overrides_set_nested_keys_from_yaml_and_cut_the_widths():
    config = ablate.pretrain_config(["loss.name=infonce", "loss.temperature=0.2", "positives=[exemplar]",
                                     "arch.widths=[32, 16, 8]"], layers=2, seed=3)
    assert (config.loss.name, config.loss.temperature, config.positives) == ("infonce", 0.2, ("exemplar",))
    assert config.arch.widths == (32, 16) and config.seed == 3
    with pytest.raises(SystemExit):
        ablate.pretrain_config(["lr"], layers=1, seed=0)


def test_macs_count_every_block():
    from contrastive_lw.model import ArchConfig, LayerwiseNet

    net = LayerwiseNet(ArchConfig(widths=(64, 128, 256)))
    assert ablate.macs_per_image(net) == 27 * 27 * 108 * 64 + 11 * 11 * 576 * 128 + 3 * 3 * 1152 * 256
    padded = LayerwiseNet(ArchConfig(widths=(64, 128, 256), paddings=(0, 1)))  # maps 27 -> 13 -> 6, 3x3 convs keep size
    assert ablate.macs_per_image(padded) == 27 * 27 * 108 * 64 + 13 * 13 * 576 * 128 + 6 * 6 * 1152 * 256


def test_read_out_chooses_the_probe_weight_decay_per_feature_set_only_among_candidates(monkeypatch):
    from types import SimpleNamespace

    from contrastive_lw.model import ArchConfig, LayerwiseNet

    g = torch.Generator().manual_seed(0)
    images = lambda n: SimpleNamespace(images=torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                                       labels=torch.arange(n) % 2)
    net, train, test = LayerwiseNet(ArchConfig(widths=(4, 6))).eval(), images(40), images(20)
    accs, chosen = ablate.read_out(net, train, test, pool=2, weight_decays=(1e3, 1e-2))
    assert list(accs) == list(chosen) == ["block_1", "block_2", "blocks_1..2"]
    assert set(chosen.values()) <= {1e3, 1e-2}
    asked, fitted = [], []
    monkeypatch.setattr(ablate, "select_weight_decay", lambda x, y, candidates: asked.append(x.shape[1]) or candidates[-1])
    probe = ablate.linear_probe_accuracy
    monkeypatch.setattr(ablate, "linear_probe_accuracy", lambda *a: fitted.append(a[-1]) or probe(*a))
    assert ablate.read_out(net, train, test, pool=2, weight_decays=(1e-1, 1e-3))[1] == dict.fromkeys(accs, 1e-3)
    assert fitted == [1e-3] * 3  # the refit on all probe images uses the chosen value
    assert asked == [4 * 4, 6 * 4, 4 * 4 + 6 * 4]  # the features of each set, block by block, pooled to 2x2
    assert ablate.read_out(net, train, test, pool=2, weight_decays=(1e-2,))[1] == dict.fromkeys(accs, 1e-2)
    assert len(asked) == 3  # one value: nothing to choose


def test_probe_wd_flag_takes_one_value_or_candidates():
    assert ablate.weight_decays("1e-2") == (1e-2,) and ablate.weight_decays("1e-3,1e-2,0.1") == (1e-3, 1e-2, 0.1)
    with pytest.raises(Exception, match=">= 0"):
        ablate.weight_decays("-1")


def test_table_averages_seeds_per_name_in_the_order_asked():
    rows = [{"name": n, "init": "layerwise", "seed": s, "accs": {"block_1": a, "block_2": a, "blocks_1..2": a},
             "train_seconds": 10.0, "macs": 2e6} for n, s, a in [("a", 0, 80.0), ("a", 1, 82.0), ("b", 0, 70.0)]]
    table = ablate.markdown_table(rows, names=["b", "a"]).splitlines()
    assert table[0].startswith("| run | init | seeds | block 1 | block 2 | blocks 1..2 |")
    assert table[2].startswith("| b | layerwise | 0 | 70.0 |") and "| 81.0 ± 1.4 |" in table[3]


def test_table_times_only_the_rows_that_trained():
    rows = [{"name": "a", "init": i, "seed": s, "accs": {"block_1": 80.0}, "train_seconds": t, "macs": 2e6}
            for i, s, t in [("runs/ablate/runs/a-seed0", 0, 0.0), ("layerwise", 1, 100.0), ("layerwise", 2, 120.0)]]
    assert ablate.markdown_table(rows).splitlines()[2] == "| a | a-seed0, layerwise | 0,1,2 | 80.0 ± 0.0 | 110 | 2.0 |"
    assert ablate.markdown_table(rows[:1]).splitlines()[2] == "| a | a-seed0 | 0 | 80.0 | – | 2.0 |"


def test_filter_figure_draws_kept_runs_beside_their_initialisation(tmp_path):
    from contrastive_lw.checkpoint import save_backbone
    from contrastive_lw.model import ArchConfig, initial_network

    net = initial_network(ArchConfig(widths=(8,)), torch.zeros(2, 3, 2, 2, dtype=torch.uint8), 0)
    save_backbone(tmp_path / "run" / "layer1.pt", net, "greedy")
    path = ablate.filter_figure(tmp_path / "f.png", [str(tmp_path / "run")], seed=0, init_scale=0.1)
    assert path.stat().st_size > 0
