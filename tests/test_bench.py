import dataclasses
import json
import math
import platform

import pytest
import torch

from contrastive_lw import bench
from contrastive_lw.cli import main
from contrastive_lw.data import ImageData, load_dataset
from contrastive_lw.model import ArchConfig, LayerwiseNet

SOURCE = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)  # the races with simulated runs read only its side
PROBE_TEST = ImageData(torch.zeros(5000, 1, 1, 1, dtype=torch.uint8), torch.zeros(5000, dtype=torch.int64), ["a"])


def test_quick_bench_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["matmul_gflops"] > 0 and isinstance(result["device"], str)
    assert result["race_batch"] == bench.BenchConfig.quick().race_batch
    assert [row["k"] for row in result["layers"]] == [1, 2]
    for row in result["layers"]:
        assert row["patch"] in (7, 13) and row["batch"] > 0
        assert row["patches_per_s"] > 0 and 0 < row["gflops"] and 0 < row["fraction_of_matmul"] < 5
    assert result["pipeline"]["patches_per_s"] > 0 and result["pipeline"]["ratio_to_model"] > 0
    race = result["layerwise_vs_end2end"]
    assert set(race) >= {"metric", "target", "layerwise_s", "end2end_s", "ratio", "layerwise_acc", "end2end_acc"}
    assert race["layerwise_s"] > 0 and race["end2end_s"] > 0 and math.isclose(race["ratio"], race["layerwise_s"] / race["end2end_s"])
    by_depth = result["layerwise_vs_end2end_by_depth"]
    assert [r["layers"] for r in by_depth] == [1, 2] and by_depth[-1] == race
    assert all(r["layerwise_s"] > 0 and 0 <= r["layerwise_acc"] <= 1 and 0 <= r["target"] <= 1 for r in by_depth)
    for r in by_depth:  # how far greedy's best run ended from the target: 0 once reached
        accs = [run["acc"] for run in r["layerwise_runs"]]
        assert r["layerwise_best"] == r["layerwise_runs"][accs.index(max(accs))]
        assert math.isclose(r["shortfall"], max(0.0, r["target"] - max(accs)), abs_tol=1e-9)
        assert (r["shortfall"] == 0) == r["reached"]
        assert 0 < r["within_noise"]["standard_error"] < 1 and r["within_noise"]["target"] < r["target"]
        assert r["work"]["layerwise_gflop"] > 0 and r["work"]["end2end_gflop"] > 0
        if r["reached"]:  # the two runs compared, re-timed back to back
            assert r["paired"]["rounds"] == 1 and r["paired"]["ratio"] > 0
        else:
            assert r["paired"] is None
        assert math.isclose(r["work"]["ratio"], r["work"]["layerwise_gflop"] / r["work"]["end2end_gflop"])
    # end-to-end trains the whole net once: its runs take the same time at every depth
    seconds = [{run["steps"]: run["seconds"] for run in r["end2end_runs"]} for r in by_depth]
    assert all(seconds[-1][steps] == s for steps, s in seconds[0].items())
    peer = result["peer_simclr"]
    assert peer["budget_s"] == race["layerwise_s"] and 0 <= peer["simclr_acc"] <= 1 and 0 <= peer["ours_acc"] <= 1
    printed = capsys.readouterr()
    assert "patches/s" in printed.out
    progress = printed.err.splitlines()  # one line per measurement as it ends, on stderr
    end2end_runs = {run["steps"] for r in by_depth for run in r["end2end_runs"]}  # the grid and any midpoints
    assert sum("end-to-end, " in line for line in progress) == len(end2end_runs) >= 2
    assert any("layer 2:" in line for line in progress)
    assert any("greedy, blocks 1-2" in line for line in progress) and "SimCLR peer" in progress[-1]


@pytest.mark.parametrize("flags, message", [(["--probe-images", "3"], "probe_images must be at least 10"),
                                            (["--batch-sizes", "256,0"], "batch sizes must be positive"),
                                            (["--seeds", "0"], "seeds must be a positive integer"),
                                            (["--race-batch", "1"], "race_batch must be at least 2"),
                                            (["--deeper-steps", "0"], "deeper_steps must be > 0"),
                                            (["--resolution", "1.5"], "resolution must be in (0, 1]"),
                                            (["--paired-rounds", "-1"], "paired_rounds must be >= 0"),
                                            (["--race-depths", "3"], "race depths must be among 1..2"),
                                            (["--backbone", "resnet18"], "add --race-only to race resnet18")])
def test_bench_refuses_bad_sizes(tmp_path, capsys, flags, message):
    assert main(["bench", "--quick", *flags, "--out", str(tmp_path / "b.json"), "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_a_resnet18_races_greedy_against_end2end(tmp_path, capsys):
    """The race on a torchvision backbone: ResNet-18 (CIFAR stem) cut after layer2, raced at depth
    3 alone; greedy's runs train blocks 1-3, end-to-end's the same three."""
    out = tmp_path / "race.json"
    assert main(["bench", "--race-only", "--backbone", "resnet18", "--cifar-stem", "--set", "bench.backbone.blocks=3",
                 "--race-depths", "3", "--race-batch", "8", "--set", "bench.end2end_steps=[2, 4]",
                 "--set", "bench.layerwise_steps=[2]", "--probe-images", "20", "--paired-rounds", "1",
                 "--resolution", "1", "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["backbone"] == {"name": "resnet18", "cifar_stem": True, "weights": "none", "blocks": 3}
    assert "layers" not in result and "peer_simclr" not in result  # --race-only: no throughput, no peer
    (race,) = result["layerwise_vs_end2end_by_depth"]
    assert race == result["layerwise_vs_end2end"] and race["layers"] == 3 and race["metric"] == "linear probe, blocks 1-3"
    assert [run["steps"] for run in race["end2end_runs"]] == [2, 4] and race["layerwise_runs"][0]["steps_per_layer"] == [2, 1, 1]
    assert race["layerwise_s"] > 0 and race["end2end_s"] > 0 and 0 <= race["layerwise_acc"] <= 1
    # counted FLOPs: 16 patches (two views of 8) of 25 x 25 pixels (layer2's receptive field) through the
    # stem, layer1 and layer2: ~6 GFLOP forward, ~17 with the backward; greedy's block 3 skips the
    # backward of blocks 1-2 and every block 1's step (3 x 3 patches) is tiny
    greedy_step, end2end_step = race["work"]["step_gflop"]["layerwise"], race["work"]["step_gflop"]["end2end"]
    assert len(greedy_step) == 3 and 0 < greedy_step[0] < 0.1 < greedy_step[1] < greedy_step[2] < end2end_step
    assert 12 < end2end_step < 24
    chosen = next(run for run in race["layerwise_runs"] if run["seconds"] == race["layerwise_s"])  # the run that counts
    assert math.isclose(race["work"]["layerwise_gflop"], sum(s * g for s, g in zip(chosen["steps_per_layer"], greedy_step)))
    printed = capsys.readouterr().out
    assert "backbone: resnet18, CIFAR stem; race batch 8" in printed and "matmul" not in printed


def test_bench_source_and_target_classes_can_be_swapped(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_bench(source, target, target_test, config, device, say):
        seen.update(source=len(source), target=target.class_names, test=target_test.class_names)
        return {}
    monkeypatch.setattr(bench, "run_bench", fake_bench)
    monkeypatch.setattr(bench, "format_table", lambda result: "")
    out = tmp_path / "b.json"
    assert main(["bench", "--source-classes", "5-9", "--target-classes", "0-4", "--out", str(out)]) == 0
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    assert seen["target"] == seen["test"] == names and seen["source"] > 0
    assert json.loads(out.read_text())["setup"]["target_classes"] == names


def test_bench_race_batch_and_paired_rounds_reach_the_race(tmp_path, monkeypatch):
    seen = {}

    def fake_bench(source, target, target_test, config, device, say):
        seen.update(race_batch=config.race_batch, paired_rounds=config.paired_rounds)
        return {}
    monkeypatch.setattr(bench, "run_bench", fake_bench)
    monkeypatch.setattr(bench, "format_table", lambda result: "")
    assert main(["bench", "--race-batch", "256", "--paired-rounds", "5", "--out", str(tmp_path / "b.json")]) == 0
    assert seen == {"race_batch": 256, "paired_rounds": 5}
    assert main(["bench", "--quick", "--set", "bench.race_batch=32", "--set", "bench.paired_rounds=2", "--paired-rounds",
                 "4", "--out", str(tmp_path / "b.json")]) == 0
    assert seen == {"race_batch": 32, "paired_rounds": 4}  # --set reaches any field; a flag wins over it


def test_layer_fractions_pair_each_round_so_drift_cancels(monkeypatch):
    base = {"matmul": 1.0, "step": 2.0, "views": 0.5}   # seconds of one timing at full speed
    slowdown = iter([1, 3, 1, 3, 3] * 3)               # the machine's speed drifts between rounds
    order = iter(["matmul", "step", "views"] * 5)
    factors: list[float] = []

    def fake_seconds(step, steps, device):
        kind = next(order)
        if kind == "matmul":
            factors.append(next(slowdown))
        return base[kind] * factors[-1]
    monkeypatch.setattr(bench, "wall_seconds", fake_seconds)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    row = bench.measure_layer(LayerwiseNet(ArchConfig(widths=(8,))), images, 1, 16, 2, torch.device("cpu"))
    assert row["rounds"] == 5 and factors == [1, 3, 1, 3, 3]
    matmul_rate = bench.matmul_step(torch.device("cpu"))[1] * bench.MATMUL_REPEATS / 1e9  # GFLOP/s at full speed
    assert row["matmul_gflops"] == matmul_rate / 3                   # rates: medians, slow rounds dominate
    assert row["patches_per_s"] == 48 * 2 / 2.0 / 3
    # ratios of neighbouring measurements do not drift: each round's ratio is the full-speed ratio
    assert row["pipeline_ratio"] == (48 * 2 / 0.5) / (48 * 2 / 2.0)
    assert math.isclose(row["fraction_of_matmul"], row["gflops"] / row["matmul_gflops"])


def test_measure_layer_trains_every_step_on_fresh_patches_of_the_images(monkeypatch):
    # a triplet loss's backward skips triplets within the margin: a batch learned by heart would flatter it
    seen: list[torch.Tensor] = []
    layer_step = bench.layer_step

    def recording_layer_step(*args, **kwargs):
        step, patches, flops = layer_step(*args, **kwargs)
        return (lambda x: (seen.append(x), step(x))), patches, flops
    monkeypatch.setattr(bench, "layer_step", recording_layer_step)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    bench.measure_layer(LayerwiseNet(ArchConfig(widths=(8,))), images, 1, 16, 3, torch.device("cpu"), rounds=2)
    assert len(seen) == 1 + 2 * 3 and all(x.shape == (48, 3, 7, 7) for x in seen)  # the warm-up, then each round's
    assert not any(torch.equal(a, b) for i, a in enumerate(seen) for b in seen[i + 1:])


def test_greedy_doubles_its_steps_until_it_reaches_the_target_or_spends_end2end_time(monkeypatch):
    """Simulated runs: end-to-end's longest takes 120 s. Block 1 alone reaches the target only at
    2 400 steps per layer (24 s), past the grid's 1 200; blocks 1-2 never do, and stop at the first
    run as long as end-to-end's longest."""

    def fake_run(config, source, target, target_test, device, depths):
        steps = config.steps_per_layer[0]
        if config.mode == "end2end":
            return steps / 10, [steps / 1500 for _ in depths]  # best: 0.8 at 1 200 steps, 120 s
        if config.arch.num_blocks == 1:
            return steps / 100, [min(0.9, steps / 3000)]
        return steps / 20, [0.5]
    monkeypatch.setattr(bench, "_pretrain_and_probe", fake_run)
    config = bench.BenchConfig(arch=ArchConfig(widths=(8, 8)), resolution=0.25)
    depth1, depth2 = bench.layerwise_vs_end2end(SOURCE, None, PROBE_TEST, config, "cpu", say=lambda line: None)
    # one midpoint each (900 / 1 800 steps fall short) leaves both within a quarter of their steps
    assert [run["steps"] for run in depth1["end2end_runs"]] == [300, 600, 900, 1200]
    assert [run["steps"] for run in depth1["layerwise_runs"]] == [150, 300, 600, 1200, 1800, 2400]
    assert depth1["reached"] and depth1["layerwise_s"] == 24 and depth1["ratio"] == 24 / 120
    assert [run["steps"] for run in depth2["layerwise_runs"]] == [150, 300, 600, 1200, 2400]
    assert not depth2["reached"] and depth2["layerwise_s"] == 120 and depth2["shortfall"] == pytest.approx(0.3)


@pytest.mark.parametrize("resolution, end2end_midpoints, greedy_midpoints",
                         [(0.25, [750, 900], [1500, 1800]),  # a quarter: 900, 750, then 1 800, 1 500
                          (0.125, [675, 750, 900], [1500, 1650, 1800])])  # the default, an eighth: one more each
def test_both_times_are_refined_to_the_same_resolution_between_a_miss_and_a_hit(monkeypatch, resolution,
                                                                                   end2end_midpoints, greedy_midpoints):
    """Simulated runs whose accuracy grows with the steps: end-to-end first reaches its 1 200-step
    best at 750 steps, greedy block 1 at 1 700. Halving the gap between the longest miss and the
    first hit finds 750 and 1 800, each within ``resolution`` of its steps of the last miss; the
    grid alone would have said 1 200 and 2 400."""
    ran = []

    def fake_run(config, source, target, target_test, device, depths):
        steps = config.steps_per_layer[0]
        if depths:  # not the re-timing of the two runs compared
            ran.append((config.mode, steps))
        if config.mode == "end2end":
            return steps / 10, [min(0.8, steps / 937.5) for _ in depths]
        return steps / 100, [min(0.9, steps / 2125)]
    monkeypatch.setattr(bench, "_pretrain_and_probe", fake_run)
    config = bench.BenchConfig(arch=ArchConfig(widths=(8,)), resolution=resolution)
    (race,) = bench.layerwise_vs_end2end(SOURCE, None, PROBE_TEST, config, "cpu", say=lambda line: None)
    assert [run["steps"] for run in race["end2end_runs"]] == [300, 600, *end2end_midpoints, 1200]
    assert [run["steps"] for run in race["layerwise_runs"]] == [150, 300, 600, 1200, *greedy_midpoints, 2400]
    assert race["reached"] and race["end2end_s"] == 75 and race["layerwise_s"] == 18
    assert race["resolution"] == resolution
    assert race["ratio"] == 18 / 75 and race["target"] == 0.8
    assert len(ran) == len(set(ran))  # no run twice


def test_greedy_deeper_blocks_train_a_fraction_of_block_one_steps(monkeypatch):
    """Greedy runs of blocks 1-2 train block 2 for ``deeper_steps`` of block 1's steps, and each
    run's schedule is in the JSON; end-to-end's runs are unchanged, and 1 gives every block the same."""
    ran = []

    def fake_run(config, source, target, target_test, device, depths):
        ran.append((config.mode, config.arch.num_blocks, config.steps_per_layer))
        steps = config.steps_per_layer[0]
        return steps / 10, [min(0.8, steps / 1500) for _ in depths]
    monkeypatch.setattr(bench, "_pretrain_and_probe", fake_run)
    config = bench.BenchConfig(arch=ArchConfig(widths=(8, 8)), layerwise_steps=(600, 1200), end2end_steps=(600, 1200))
    _, depth2 = bench.layerwise_vs_end2end(SOURCE, None, PROBE_TEST, config, "cpu", say=lambda line: None)
    assert ("greedy", 2, (600, 150)) in ran and ("greedy", 1, (600,)) in ran and ("end2end", 2, (600,)) in ran
    assert depth2["deeper_steps"] == 0.25
    assert [run["steps_per_layer"] for run in depth2["layerwise_runs"]][:2] == [[600, 150], [900, 225]]
    assert bench.BenchConfig(deeper_steps=1).greedy_schedule(300, 3) == (300, 300, 300)
    assert bench.BenchConfig(deeper_steps=0.001).greedy_schedule(300, 2) == (300, 1)


def test_race_work_is_each_compared_runs_steps_times_its_steps_flops(monkeypatch):
    """Simulated runs reaching 0.8 from 1 200 steps on both sides (900 falls short), each step's
    GFLOPs given: greedy's 1 200 / 300 steps of 1 and 3 GFLOP against end-to-end's 1 200 of 5."""
    def fake_run(config, source, target, target_test, device, depths):
        steps = config.steps_per_layer[0]
        return steps / 10, [min(0.8, steps / 1500) for _ in depths]
    monkeypatch.setattr(bench, "_pretrain_and_probe", fake_run)
    monkeypatch.setattr(bench, "race_step_gflop", lambda config, device, image_side: ([1.0, 3.0], 5.0))
    config = bench.BenchConfig(arch=ArchConfig(widths=(8, 8)), layerwise_steps=(600, 1200), end2end_steps=(600, 1200))
    depth1, depth2 = bench.layerwise_vs_end2end(SOURCE, None, PROBE_TEST, config, "cpu", say=lambda line: None)
    assert depth2["work"] == {"layerwise_gflop": 1200 + 300 * 3, "end2end_gflop": 1200 * 5, "ratio": 2100 / 6000,
                              "step_gflop": {"layerwise": [1.0, 3.0], "end2end": 5.0}}
    assert depth1["work"]["layerwise_gflop"] == 1200 and depth1["work"]["step_gflop"]["layerwise"] == [1.0]


def test_the_two_runs_compared_are_re_timed_back_to_back_so_drift_cancels(monkeypatch):
    """Simulated runs reaching 0.8 at 1 200 steps on both sides (greedy 10x cheaper a step) on a
    machine 3x slower while end-to-end's runs of the race ran: the race's ratio reads 1/30. The
    re-timing runs greedy, then end-to-end, in each round, seed 0 and no probe, and the median of
    each round's ratio is the full-speed 1/10 even though the speed drifts between rounds."""
    slowdown = iter([1, 1, 3, 3, 2, 2, 3, 3])  # one factor per re-timed run: both runs of a round alike
    retimed = []

    def fake_run(config, source, target, target_test, device, depths):
        steps = config.steps_per_layer[0]
        if not depths:
            retimed.append((config.mode, config.steps_per_layer, config.seed))
            return steps / (100 if config.mode == "greedy" else 10) * next(slowdown), []
        if config.mode == "end2end":
            return 3 * steps / 10, [min(0.8, steps / 1500) for _ in depths]
        return steps / 100, [min(0.8, steps / 1500)]
    monkeypatch.setattr(bench, "_pretrain_and_probe", fake_run)
    config = bench.BenchConfig(arch=ArchConfig(widths=(8,)), layerwise_steps=(600, 1200), end2end_steps=(600, 1200),
                               seeds=2, paired_rounds=3)
    (race,) = bench.layerwise_vs_end2end(SOURCE, None, PROBE_TEST, config, "cpu", say=lambda line: None)
    assert race["ratio"] == pytest.approx(1 / 30)
    assert retimed == [("greedy", (1200,), 0), ("end2end", (1200,), 0)] * 3
    paired = race["paired"]
    assert paired["rounds"] == 3 and paired["layerwise_s"] == [12, 36, 24] and paired["end2end_s"] == [120, 360, 240]
    assert paired["ratio"] == pytest.approx(1 / 10)
    assert "time ratio 0.10 (median of 3 round(s))" in bench._paired_lines(paired)[0]
    # no re-timing with no rounds
    retimed.clear()
    (race,) = bench.layerwise_vs_end2end(SOURCE, None, PROBE_TEST, dataclasses.replace(config, paired_rounds=0),
                                         "cpu", say=lambda line: None)
    assert race["paired"] is None and retimed == [] and bench._paired_lines(None) == []
    with pytest.raises(bench.ConfigError, match="paired_rounds"):
        bench.BenchConfig(paired_rounds=-1)


def test_the_race_trains_the_greedy_layers_without_the_joint_pass():
    from contrastive_lw.bench import BenchConfig, race_config
    from contrastive_lw.pretrain import PretrainConfig

    assert PretrainConfig().joint_fraction > 0 and race_config(BenchConfig()).joint_fraction == 0


def test_race_step_flops_count_what_each_side_trains():
    config = bench.BenchConfig(arch=ArchConfig(widths=(8, 16)), race_batch=32)
    (block1, block2), end2end = bench.race_step_gflop(config, torch.device("cpu"), 32)
    patches = 2 * 32  # two views
    conv1 = 2 * patches * 8 * 8 * (6 * 6 * 3) * 8 / 1e9   # block 1's forward on 13 x 13 patches (8 x 8 outputs)
    conv2 = 2 * patches * 2 * 2 * (3 * 3 * 8) * 16 / 1e9  # block 2's forward (2 x 2 outputs)
    # greedy block 2: block 1's forward, block 2's forward and weight gradient; end-to-end also
    # block 1's weight gradient and block 2's input gradient (each as many FLOPs as the forward)
    assert math.isclose(end2end - block2, conv1 + conv2, rel_tol=1e-9)
    assert 0 < block1 < block2


def test_within_noise_reads_the_runs_against_the_target_less_one_standard_error(monkeypatch):
    """End-to-end's best, 0.8 at 1 200 steps, is 0.005 above its 600-step run; the probe's standard
    error on 5 000 test images is sqrt(0.8 * 0.2 / 5000) = 0.0057, so within the noise end-to-end
    is done at 600 steps (60 s) and greedy at its 300 steps (0.797, 3 s); the race itself still
    times both to the best (12 s against 120 s)."""

    def fake_run(config, source, target, target_test, device, depths):
        steps = config.steps_per_layer[0]
        if config.mode == "end2end":
            return steps / 10, [0.8 if steps >= 1200 else 0.795 if steps >= 600 else 0.7 for _ in depths]
        return steps / 100, [0.81 if steps >= 1200 else 0.797 if steps >= 300 else 0.7]
    monkeypatch.setattr(bench, "_pretrain_and_probe", fake_run)
    config = bench.BenchConfig(arch=ArchConfig(widths=(8,)))
    (race,) = bench.layerwise_vs_end2end(SOURCE, None, PROBE_TEST, config, "cpu", say=lambda line: None)
    assert race["ratio"] == 12 / 120
    noise = race["within_noise"]
    assert noise["standard_error"] == pytest.approx((0.8 * 0.2 / 5000) ** 0.5)
    assert noise["target"] == pytest.approx(0.8 - noise["standard_error"])
    assert (noise["layerwise_s"], noise["end2end_s"], noise["ratio"]) == (3, 60, 3 / 60)
    assert "standard error" in bench._noise_line(noise)
    assert "never" in bench._noise_line({**noise, "layerwise_s": None, "ratio": None})


def test_bench_refuses_a_resolution_outside_0_1():
    with pytest.raises(bench.ConfigError, match="resolution"):
        bench.BenchConfig(resolution=0)


def test_each_race_run_is_the_mean_over_its_seeds(monkeypatch):
    """Simulated runs whose time and accuracy depend on the seed: with two seeds every run of the
    race is the mean of seeds 0 and 1, and the race's verdict follows the means."""
    ran = []

    def fake_run(config, source, target, target_test, device, depths):
        ran.append((config.mode, config.steps_per_layer, config.seed))
        steps, offset = config.steps_per_layer[0], 0.1 * config.seed
        if config.mode == "end2end":
            return steps / 10 + 10 * config.seed, [min(0.8, steps / 1500) + offset for _ in depths]
        return steps / 100, [min(0.9, steps / 1500) + offset]
    monkeypatch.setattr(bench, "_pretrain_and_probe", fake_run)
    config = bench.BenchConfig(arch=ArchConfig(widths=(8,)), seeds=2)
    (race,) = bench.layerwise_vs_end2end(SOURCE, None, PROBE_TEST, config, "cpu", say=lambda line: None)
    assert race["seeds"] == 2 and {seed for *_, seed in ran} == {0, 1}
    assert all((mode, steps, 1 - seed) in ran for mode, steps, seed in ran)  # every run with both seeds
    assert race["target"] == pytest.approx(0.85)  # end-to-end's 1 200 steps: (0.8 + 0.9) / 2
    assert race["end2end_s"] == pytest.approx(125)  # (120 + 130) / 2
    assert race["reached"] and race["layerwise_s"] == pytest.approx(12) and race["layerwise_acc"] == pytest.approx(0.85)
    # each run keeps its seeds' accuracies; every run's two differ by 0.1: std 0.1 / sqrt(2), its mean +-0.05
    assert [run["seed_accs"] for run in race["end2end_runs"] if run["steps"] == 1200] == [[0.8, pytest.approx(0.9)]]
    assert all(len(run["seed_accs"]) == 2 for run in race["layerwise_runs"])
    spread = race["seed_spread"]
    assert spread["runs"] == len(race["layerwise_runs"]) + len(race["end2end_runs"]) and spread["seeds"] == 2
    assert spread["std"] == pytest.approx(0.1 / 2 ** 0.5) and spread["standard_error"] == pytest.approx(0.05)
    assert bench._seed_spread([[0.5], [0.6]]) is None  # one seed: no spread to read
    table = bench.format_table({"device": "cpu", "load_avg_1min": {"start": 0, "end": 0}, "race_batch": 64,
                                "matmul_gflops": 1.0, "layers": [], "layerwise_vs_end2end_by_depth": [race],
                                "peer_simclr": {"budget_s": 1.0, "simclr_acc": 0.5, "ours_acc": 0.5}})
    assert "mean of 2 seeds" in table and "its mean of 2 by +-5.00" in table


def test_heldout_test_adds_the_target_training_images_the_probe_does_not_train_on(tmp_path, monkeypatch):
    seen = []

    def fake_bench(source, target, target_test, *rest):
        seen.append((target, target_test))
        return {}
    monkeypatch.setattr(bench, "run_bench", fake_bench)
    monkeypatch.setattr(bench, "format_table", lambda result: "")
    for flags in ([], ["--heldout-test"]):
        out = tmp_path / "b.json"
        assert main(["bench", "--probe-images", "1000", *flags, "--out", str(out)]) == 0
        assert json.loads(out.read_text())["setup"]["heldout_test"] == bool(flags)
    (target, test), (heldout_target, heldout_test) = seen
    train_images = len(load_dataset("sample", "train", classes="5-9"))
    assert torch.equal(heldout_target.images, target.images) and len(test) == 500
    assert len(heldout_test) == 500 + train_images - 1000 and torch.equal(heldout_test.images[:500], test.images)
    probe_train = {image.numpy().tobytes() for image in target.images}
    assert not any(image.numpy().tobytes() in probe_train for image in heldout_test.images)
    assert heldout_test.class_names == test.class_names and set(heldout_test.labels[500:].tolist()) == set(range(5))


def test_the_device_names_the_cpu_model(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n")
    assert bench.cpu_model(cpuinfo) == "AMD EPYC 7B13"
    assert bench.cpu_model(tmp_path / "missing") == (platform.processor() or platform.machine())
    assert bench.describe_device(torch.device("cpu")).startswith(f"{bench.cpu_model()} CPU, ")


@pytest.mark.parametrize("ratio, noise_ratio, paired_ratio, reached, verdict", [
    (0.4, 0.5, 0.45, True, "greedy faster"),
    (1.6, 1.3, 1.7, True, "end-to-end faster"),
    (0.8, 1.2, 0.9, True, "within noise"),       # the target's reading and the noise band's disagree
    (0.8, 0.9, 1.1, True, "within noise"),       # re-timed back to back, the other side wins
    (0.9, None, None, True, "within noise"),     # greedy never came within the noise band
    (1.0, None, None, False, "end-to-end faster"),
])
def test_each_race_says_whether_its_time_ratio_is_beyond_noise(ratio, noise_ratio, paired_ratio, reached, verdict):
    race = {"reached": reached, "ratio": ratio, "within_noise": {"ratio": noise_ratio},
            "paired": None if paired_ratio is None else {"ratio": paired_ratio}}
    assert bench.race_verdict(race) == verdict
