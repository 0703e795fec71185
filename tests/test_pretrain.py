import json

import pytest
import torch

from contrastive_lw import load_backbone
from contrastive_lw.augment import AugmentConfig
from contrastive_lw.backbones import BackboneConfig
from contrastive_lw.errors import CheckpointError, ConfigError, TrainingDiverged
from contrastive_lw.losses import InfoNCELoss, LossConfig, TripletLoss
from contrastive_lw.heads import ProjectionHead
from contrastive_lw.model import ArchConfig
from contrastive_lw.pretrain import LayerwisePretrainer, PretrainConfig, train_step


def _config(**kw):
    values = dict(arch=ArchConfig(widths=(4, 6, 8)), steps_per_layer=3, batch_size=16, log_every=1,
                  joint_fraction=0.0)  # greedy alone unless a test asks for the joint pass
    values.update(kw)
    return PretrainConfig(**values)


def _fit(out, images, **kw):
    return LayerwisePretrainer(_config(**kw), out, device="cpu", progress=False).fit(images)


def test_greedy_run_writes_every_layer_and_logs(tmp_path, images):
    net = _fit(tmp_path, images)
    assert net.num_blocks == 3
    for k in (1, 2, 3):
        assert (tmp_path / f"layer{k}.pt").is_file()
        assert load_backbone(tmp_path / f"layer{k}.pt").num_blocks == k
    assert (tmp_path / "filters_layer1.png").stat().st_size > 0
    assert any((tmp_path / "tb").iterdir())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["layer"] for r in rows} == {1, 2, 3}
    assert all({"loss", "lr", "pos_cos", "embedding_std", "patches_per_s"} <= set(r) for r in rows)


def test_greedy_freezes_finished_blocks(tmp_path, images):
    net = _fit(tmp_path, images, arch=ArchConfig(widths=(4, 6)))
    after_layer1 = load_backbone(tmp_path / "layer1.pt")
    assert torch.equal(net.blocks[0].conv.weight, after_layer1.blocks[0].conv.weight)


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_layer_one_learns(tmp_path, images):
    """Against the exact starting weights: the weights moved, and the loss and the margin of the
    positive cosine over the negative one improve on the first steps' (each logged row is taken
    before its step's update; the small initial weights start with every embedding alike)."""
    config = _config(arch=ArchConfig(widths=(8,)), steps_per_layer=60, batch_size=64, lr=0.01,
                     loss=LossConfig(name="triplet"), positives=("exemplar",))
    trainer = LayerwisePretrainer(config, tmp_path, device="cpu", progress=False)
    start = trainer.initial_network(images)
    trained = trainer.fit(images)
    assert not torch.equal(trained.blocks[0].conv.weight, start.blocks[0].conv.weight)
    rows = _rows(tmp_path)
    first, last = rows[:5], rows[-5:]
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "loss") < 0.7 * mean(first, "loss")
    gap = lambda rs: mean(rs, "pos_cos") - mean(rs, "neg_cos")  # noqa: E731
    assert gap(last) > gap(first) + 0.2


def test_end_to_end_trains_block_one_too(tmp_path, images):
    trainer = LayerwisePretrainer(_config(arch=ArchConfig(widths=(4, 6)), mode="end2end"), tmp_path,
                                  device="cpu", progress=False)
    start = trainer.initial_network(images)
    trained = trainer.fit(images)
    for k in (0, 1):
        assert not torch.equal(trained.blocks[k].conv.weight, start.blocks[k].conv.weight)


def test_resume_skips_finished_layers(tmp_path, images):
    _fit(tmp_path, images)
    layer1 = (tmp_path / "layer1.pt").read_bytes()
    for k in (2, 3):
        (tmp_path / f"layer{k}.pt").unlink()
    rows_before = len((tmp_path / "metrics.jsonl").read_text().splitlines())
    _fit(tmp_path, images)
    assert (tmp_path / "layer1.pt").read_bytes() == layer1
    new_rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()[rows_before:]]
    assert {r["layer"] for r in new_rows} == {2, 3}


def test_joint_pass_trains_every_block_from_the_greedy_ones_and_replaces_the_last_layer(tmp_path, images):
    greedy = _fit(tmp_path / "greedy", images, arch=ArchConfig(widths=(4, 6)))
    joint = _fit(tmp_path / "joint", images, arch=ArchConfig(widths=(4, 6)), joint_fraction=4 / 3, joint_lr=0.01)
    layer1 = load_backbone(tmp_path / "joint" / "layer1.pt")
    assert torch.equal(layer1.blocks[0].conv.weight, greedy.blocks[0].conv.weight)  # the same greedy layers ...
    for k in (0, 1):  # ... then every block moved
        assert not torch.equal(joint.blocks[k].conv.weight, greedy.blocks[k].conv.weight)
    assert torch.equal(load_backbone(tmp_path / "joint").blocks[0].conv.weight, joint.blocks[0].conv.weight)
    metrics = torch.load(tmp_path / "joint" / "layer2.pt", weights_only=False)["metrics"]
    assert metrics["steps"] == 3 and metrics["joint_steps"] == 4 and metrics["joint_seconds"] > 0
    rows = _rows(tmp_path / "joint")
    assert [(r["layer"], r["layer_step"]) for r in rows if r.get("joint")] == [(2, s) for s in range(1, 5)]
    assert len(rows) == 3 + 3 + 4


def test_joint_pass_starts_from_the_last_layers_head(tmp_path, images):
    _fit(tmp_path / "greedy", images, arch=ArchConfig(widths=(4, 6)))
    _fit(tmp_path / "joint", images, arch=ArchConfig(widths=(4, 6)), joint_fraction=1.0, joint_lr=1e-12)
    greedy, joint = (torch.load(tmp_path / run / "layer2.pt", weights_only=False)["head"]
                     for run in ("greedy", "joint"))
    assert greedy.keys() == joint.keys() and all(torch.allclose(greedy[n], joint[n], atol=1e-6) for n in greedy)


def test_joint_pass_draws_other_patches_than_the_last_layer(tmp_path, images, monkeypatch):
    from contrastive_lw import pretrain

    seeds, sampler = [], pretrain.PatchSampler

    def recording(*args, seed, **kwargs):
        seeds.append(seed)
        return sampler(*args, seed=seed, **kwargs)
    monkeypatch.setattr(pretrain, "PatchSampler", recording)
    _fit(tmp_path, images, arch=ArchConfig(widths=(4, 6)), joint_fraction=1.0)
    assert len(seeds) == 3 and seeds[2] not in seeds[:2]  # layer 1, layer 2, then the joint pass's own


def test_joint_pass_takes_its_own_batch_size(tmp_path, images, monkeypatch):
    from contrastive_lw import pretrain

    batches = []

    class Recording(pretrain.PatchSampler):
        def sample_indices(self, shape, batch_size, *args, **kwargs):
            batches.append(batch_size)
            return super().sample_indices(shape, batch_size, *args, **kwargs)
    monkeypatch.setattr(pretrain, "PatchSampler", Recording)
    _fit(tmp_path, images, arch=ArchConfig(widths=(4, 6)), joint_fraction=1.0, joint_batch_size=8)
    assert batches == [16] * 6 + [8] * 3  # layers 1 and 2 at batch_size, then the joint pass's 3 steps
    with pytest.raises(ConfigError, match="joint_batch_size"):
        _config(joint_batch_size=-1)


def test_one_block_has_no_joint_pass(tmp_path, images):
    _fit(tmp_path, images, arch=ArchConfig(widths=(4,)), joint_fraction=1.0)
    assert not any(r.get("joint") for r in _rows(tmp_path))


def test_joint_pass_runs_once_and_follows_a_finished_greedy_run(tmp_path, images):
    _fit(tmp_path, images, arch=ArchConfig(widths=(4, 6)))
    before = load_backbone(tmp_path)
    _fit(tmp_path, images, arch=ArchConfig(widths=(4, 6)), joint_fraction=0.6)  # the greedy layers are done: joint only
    assert [r.get("joint", False) for r in _rows(tmp_path)] == [False] * 6 + [True] * 2
    after = load_backbone(tmp_path)
    assert not torch.equal(after.blocks[0].conv.weight, before.blocks[0].conv.weight)
    _fit(tmp_path, images, arch=ArchConfig(widths=(4, 6)), joint_fraction=0.6)  # done: nothing more
    assert len(_rows(tmp_path)) == 8
    assert torch.equal(load_backbone(tmp_path).blocks[0].conv.weight, after.blocks[0].conv.weight)


def test_resume_refuses_another_architecture(tmp_path, images):
    _fit(tmp_path, images, arch=ArchConfig(widths=(4,)))
    with pytest.raises(CheckpointError, match="another architecture"):
        _fit(tmp_path, images, arch=ArchConfig(widths=(5,)))


def test_end_to_end_mode_trains_all_blocks_at_once(tmp_path, images):
    net = _fit(tmp_path, images, mode="end2end", arch=ArchConfig(widths=(4, 6)), joint_fraction=0.6)  # no joint pass
    assert sorted(p.name for p in tmp_path.glob("layer*.pt")) == ["layer2.pt"]
    assert "joint_steps" not in torch.load(tmp_path / "layer2.pt", weights_only=False)["metrics"]
    assert not any(r.get("joint") for r in _rows(tmp_path))
    assert net.num_blocks == 2
    assert (tmp_path / "filters_layer1.png").stat().st_size > 0  # as a greedy run draws them (and the race times)


class _NanAfter(torch.nn.Module):
    """Triplet loss that turns NaN after ``calls`` calls."""

    uses_negatives = True

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def forward(self, a, p, n):
        self.calls -= 1
        loss = (a - p).pow(2).mean()
        return loss * float("nan") if self.calls < 0 else loss


def test_nan_loss_stops_and_keeps_finished_layers(tmp_path, images):
    trainer = LayerwisePretrainer(_config(), tmp_path, device="cpu", progress=False)
    trainer.loss_fn = _NanAfter(calls=4)   # layer 1 takes 3 steps, layer 2 diverges
    with pytest.raises(TrainingDiverged, match="lower --lr"):
        trainer.fit(images)
    assert (tmp_path / "layer1.pt").is_file() and not (tmp_path / "layer2.pt").exists()
    load_backbone(tmp_path)


def test_bad_images_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="uint8"):
        _fit(tmp_path, torch.rand(4, 3, 32, 32))
    with pytest.raises(ConfigError, match="in_channels"):
        _fit(tmp_path, torch.zeros(4, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="larger than the 16x16 images"):
        _fit(tmp_path, torch.zeros(4, 3, 16, 16, dtype=torch.uint8), positives=("exemplar",))


def test_steps_per_layer_is_per_layer_and_the_last_repeats(tmp_path, images):
    _fit(tmp_path, images, steps_per_layer=(4, 2), log_every=10 ** 6)
    steps = [torch.load(tmp_path / f"layer{k}.pt", weights_only=True)["metrics"]["steps"] for k in (1, 2, 3)]
    assert steps == [4, 2, 2]


def test_end2end_trains_the_first_entry_of_steps_per_layer(tmp_path, images):
    _fit(tmp_path, images, mode="end2end", steps_per_layer=(4, 2), log_every=10 ** 6)
    assert torch.load(tmp_path / "layer3.pt", weights_only=True)["metrics"]["steps"] == 4


def test_steps_per_layer_reads_one_int_as_every_layers():
    assert _config(steps_per_layer=5).steps_per_layer == (5,)
    assert PretrainConfig.from_dict({"steps_per_layer": 5}) == PretrainConfig.from_dict({"steps_per_layer": [5]})
    config = PretrainConfig.from_dict({"steps_per_layer": [0, 7]})  # 0: the epochs' steps (block 1: 4 epochs)
    assert (config.steps(100, 1), config.steps(100, 2), config.steps(100, 5)) == (4 * config.epoch_steps(100), 7, 7)


def test_crop_scales_set_each_layers_crop_and_the_last_repeats(tmp_path, images, monkeypatch):
    from contrastive_lw import pretrain

    config = PretrainConfig.from_dict({"crop_scales": [[], [0.2, 1]], "augment": {"crop_scale": [0.5, 1]}})
    assert [config.layer_augment(k).crop_scale for k in (1, 2, 3)] == [(0.5, 1.0), (0.2, 1.0), (0.2, 1.0)]
    assert config.layer_augment(2).jitter == config.augment.jitter
    assert PretrainConfig(crop_scales=()).layer_augment(3) == AugmentConfig()
    with pytest.raises(ConfigError, match="crop_scales: layer 2"):
        PretrainConfig(crop_scales=((0.6, 1.0), (0.0, 1.0)))
    built = []
    build = pretrain.build_augmentation
    monkeypatch.setattr(pretrain, "build_augmentation", lambda cfg, channels: built.append(cfg.crop_scale) or build(cfg, channels))
    _fit(tmp_path, images, crop_scales=((0.9, 1.0), (0.5, 1.0)))
    assert built == [(0.9, 1.0), (0.5, 1.0), (0.5, 1.0)]  # one augmentation per layer, the last entry repeats


def test_batch_size_is_per_layer_and_sets_each_layers_batch_and_epoch(tmp_path, images, monkeypatch):
    from contrastive_lw import pretrain

    config = PretrainConfig.from_dict({"batch_size": [8, 4], "steps_per_layer": [], "epochs_per_layer": 1})
    assert [config.layer_batch_size(k) for k in (1, 2, 3)] == [8, 4, 4]
    assert [config.steps(10, k) for k in (1, 2, 3)] == [10 * 16 // 8, 10 * 16 // 4, 10 * 16 // 4]
    assert PretrainConfig(batch_size=64).batch_size == (64,)
    batches = []
    step = pretrain.train_step
    monkeypatch.setattr(pretrain, "train_step", lambda model, loss_fn, optimizer, x, views, head:
                        batches.append(len(x) // views) or step(model, loss_fn, optimizer, x, views, head))
    _fit(tmp_path, images, batch_size=(16, 8), steps_per_layer=1)
    assert batches == [16, 8, 8]
    monkeypatch.setattr(pretrain.distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match=r"batch_size \[16, 7\] must divide evenly over 2"):
        LayerwisePretrainer(_config(batch_size=(16, 7)), tmp_path / "ddp", device="cpu")


def test_first_blocks_cuts_lw_and_torchvision_backbones_alike():
    lw = PretrainConfig(arch=ArchConfig(widths=(8, 16, 32)), lr=0.01).first_blocks(2)
    assert lw.arch.widths == (8, 16) and lw.lr == 0.01
    resnet = PretrainConfig(backbone=BackboneConfig(name="resnet18", cifar_stem=True)).first_blocks(3)
    assert resnet.backbone == BackboneConfig(name="resnet18", cifar_stem=True, blocks=3)


def test_epochs_per_layer_reads_one_number_as_every_layers():
    config = PretrainConfig.from_dict({"epochs_per_layer": 2, "steps_per_layer": []})
    assert config.epochs_per_layer == (2.0,)
    assert [config.steps(100, k) for k in (1, 3)] == [2 * config.epoch_steps(100, k) for k in (1, 3)]
    with pytest.raises(ConfigError, match="epochs_per_layer"):
        _config(epochs_per_layer=(1.0, 0.0))


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(lr=0.0), dict(mode="joint"),
                                 dict(positives=("near",)), dict(steps_per_layer=-1), dict(negative="near"),
                                 dict(steps_per_layer=(10, -1)), dict(batch_size=(16, 0)), dict(batch_size=()),
                                 dict(joint_fraction=-0.5), dict(joint_lr=0.0)])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError):
        _config(**bad)


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match="learning_rate"):
        PretrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match=r"\['depth'\] in pretrain config.arch"):
        PretrainConfig.from_dict({"arch": {"depth": 3}})


def test_ten_by_ten_patches_on_a_six_by_six_block(tmp_path, images):
    """The paper's 10x10-patch variant: block 1's 2x2 output map is flattened by the head."""
    net = _fit(tmp_path, images, arch=ArchConfig(widths=(4,)), patch_sizes=(10,))
    assert net.output_size(10, 1) == 2
    head = torch.load(tmp_path / "layer1.pt", weights_only=True)["head"]
    assert head["1.weight"].shape[1] == 4 * 2 * 2


def test_patch_smaller_than_the_receptive_field(tmp_path, images):
    with pytest.raises(ConfigError, match="smaller than block 1's receptive field"):
        _fit(tmp_path, images, arch=ArchConfig(widths=(4,)), patch_sizes=(5,))


def test_video_clips_pretrain_with_last_frame_positives(tmp_path):
    clips = torch.randint(0, 256, (6, 4, 3, 16, 16), dtype=torch.uint8)
    net = _fit(tmp_path, clips, arch=ArchConfig(widths=(4,)))
    assert net.num_blocks == 1 and (tmp_path / "layer1.pt").is_file()


def test_collapse_measure_matches_lightly_and_the_run_does_not_import_lightly(tmp_path):
    import subprocess
    import sys

    from lightly.utils.debug import std_of_l2_normalized as lightly_measure

    from contrastive_lw.pretrain import std_of_l2_normalized

    z = torch.randn(64, 16)
    torch.testing.assert_close(std_of_l2_normalized(z), lightly_measure(z))
    assert std_of_l2_normalized(torch.ones(8, 4)) == 0  # collapsed
    # a plain pretraining run (triplet loss, logging every step) needs no lightly import (~0.8 s)
    script = ("import sys, torch\n"
              "from contrastive_lw.model import ArchConfig\n"
              "from contrastive_lw.pretrain import LayerwisePretrainer, PretrainConfig\n"
              "config = PretrainConfig(arch=ArchConfig(widths=(4,)), steps_per_layer=2, batch_size=8, log_every=1)\n"
              f"LayerwisePretrainer(config, {str(tmp_path)!r}, 'cpu', progress=False, tensorboard=False)"
              ".fit(torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8))\n"
              "assert 'lightly' not in sys.modules, 'lightly was imported'\n")
    subprocess.run([sys.executable, "-c", script], check=True)
    assert (tmp_path / "layer1.pt").is_file()


class _Recording(torch.nn.Module):
    """A loss that records the width of the embeddings it is given."""

    def __init__(self, loss):
        super().__init__()
        self.loss, self.uses_negatives, self.widths = loss, loss.uses_negatives, []
        self.compares_all_pairs = loss.compares_all_pairs

    def forward(self, *embeddings):
        self.widths.append(embeddings[0].shape[1])
        return self.loss(*embeddings)


@pytest.mark.parametrize("loss", [InfoNCELoss(0.1), TripletLoss(mining="semihard"), TripletLoss(mining="all"),
                                  TripletLoss(distance="sqeuclidean")])
def test_all_pairs_losses_run_in_the_heads_output_space_with_the_same_loss_and_gradient(loss):
    torch.manual_seed(0)
    views = 3 if loss.uses_negatives else 2
    x = torch.randn(views * 24, 6, 1, 1)
    grads, losses, recording = [], [], _Recording(loss)
    for head in (None, "given"):
        torch.manual_seed(1)
        model = ProjectionHead(6, 32)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keeps the weights for the comparison
        step_loss, embeddings = train_step(model, recording, optimizer, x, views, model if head else None)
        losses.append(step_loss.detach())
        grads.append([p.grad for p in model.parameters()])
        assert [e.shape[1] for e in embeddings] == [32] * views  # what is logged: the embeddings themselves
    assert recording.widths == ([32, 7] if loss.compares_all_pairs else [32, 32])
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for without, within in zip(*grads):
        torch.testing.assert_close(within, without, atol=1e-5, rtol=1e-4)


def test_greedy_infonce_stage_runs_its_loss_in_the_heads_output_space(tmp_path, images):
    trainer = LayerwisePretrainer(_config(loss=LossConfig(name="infonce")), tmp_path, device="cpu", progress=False)
    trainer.loss_fn = recording = _Recording(trainer.loss_fn)
    trainer.fit(images)
    # blocks of 4, 6, 8 channels (1 x 1 outputs on their receptive field) -> 128-dim embeddings
    assert recording.widths == [5] * 3 + [7] * 3 + [9] * 3
