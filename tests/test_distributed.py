"""Data-parallel pretraining under torchrun (2 CPU processes, gloo) matches one process."""
import os
import subprocess
import sys

import numpy as np
import torch

from contrastive_lw.checkpoint import BACKBONE, load_checkpoint


def test_two_gloo_processes_match_one_process(tmp_path, images):
    """Hardest-negative mining gathers candidates across ranks, so it must match too."""
    np.savez(tmp_path / "images.npz", images=images.numpy())
    common = ["-m", "contrastive_lw", "pretrain", "--dataset", f"npz:{tmp_path / 'images.npz'}",
              "--widths", "4", "--steps-per-layer", "5", "--batch-size", "32", "--no-augment",
              "--loss", "triplet", "--mining", "hardest", "--no-progress"]  # triplet: no longer the default
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], env=env, check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    *common, "--out", str(tmp_path / "two")], env=env, check=True, timeout=300)
    one = load_checkpoint(tmp_path / "one" / "layer1.pt", BACKBONE)["backbone"]
    two = load_checkpoint(tmp_path / "two" / "layer1.pt", BACKBONE)["backbone"]
    for name in one:
        # same global batch, gradients all-reduced: equal up to float summation order
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_two_ranks_with_augmentation_and_infonce_match_one_process_over_two_layers(tmp_path, images):
    """Augmentation on (each rank keeps its share of the global batch's draws, not the first
    slice's) and InfoNCE's cross-rank gather, through layers 1 and 2 (without BatchNorm, whose
    statistics stay per rank on the CPU: SyncBatchNorm runs on GPUs only)."""
    np.savez(tmp_path / "images.npz", images=images.numpy())
    (tmp_path / "arch.yaml").write_text("pretrain:\n  arch: {batch_norm: [false]}\n")
    common = ["-m", "contrastive_lw", "pretrain", "--dataset", f"npz:{tmp_path / 'images.npz'}",
              "--widths", "4,6", "--steps-per-layer", "4", "--batch-size", "32", "--loss", "infonce",
              "--no-progress", "--config", str(tmp_path / "arch.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], env=env, check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    *common, "--out", str(tmp_path / "two")], env=env, check=True, timeout=300)
    for layer in (1, 2):
        one = load_checkpoint(tmp_path / "one" / f"layer{layer}.pt", BACKBONE)["backbone"]
        two = load_checkpoint(tmp_path / "two" / f"layer{layer}.pt", BACKBONE)["backbone"]
        for name in one:
            torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4)


def test_transfer_under_torchrun_matches_one_process(tmp_path, images):
    labels = np.arange(len(images)) % 2
    np.savez(tmp_path / "images.npz", images=images.numpy(), labels=labels)
    (tmp_path / "t.yaml").write_text("transfer: {new_widths: [], hidden: 16, augment: false, epochs: 2, "
                                     "batch_size: 16, layers: 1, mode: finetune, l2sp: 0.1}\n")
    common = ["-m", "contrastive_lw", "transfer", "--init", "random", "--dataset", f"npz:{tmp_path / 'images.npz'}",
              "--config", str(tmp_path / "t.yaml"), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], env=env, check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    *common, "--out", str(tmp_path / "two")], env=env, check=True, timeout=300)
    one = torch.load(tmp_path / "one" / "state.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "state.pt", weights_only=True)
    assert one["epoch"] == two["epoch"] == 2
    for name in one["model"]:
        torch.testing.assert_close(two["model"][name], one["model"][name], atol=1e-5, rtol=1e-4)
    assert (tmp_path / "two" / "results.json").is_file()


def test_the_process_group_is_destroyed_at_exit(monkeypatch):
    """A rank that exits with its gloo group alive can abort in the interpreter's teardown."""
    import atexit

    from contrastive_lw import distributed

    registered, destroyed = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: bool(registered) and not destroyed)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: None)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: destroyed.append(True))
    monkeypatch.setattr(atexit, "register", registered.append)
    assert distributed.init_distributed(torch.device("cpu")) == torch.device("cpu")
    assert registered == [distributed.leave_process_group]
    registered[0]()
    registered[0]()  # once destroyed, a second call is a no-op
    assert destroyed == [True]


def test_kornia_augmentation_draws_differ_between_ranks_and_keep_the_generator_in_step(monkeypatch, images):
    """kornia draws for a rank's own samples only: seeded by rank, rank 1 must not repeat rank 0's
    draws, and every rank's global generator must advance alike (the patch positions come from it)."""
    from contrastive_lw.augment import AugmentConfig, build_augmentation
    from contrastive_lw.patches import PatchSampler
    from contrastive_lw.pretrain import augmented_views

    augment = build_augmentation(AugmentConfig(backend="kornia"))
    frames = images[:8]
    where = list(PatchSampler(7, "adjacent", seed=3).sample_indices(frames.shape, 4, torch.device("cpu")))[:2]
    columns = (16, torch.tensor([0, 1, 2, 3, 8, 9, 10, 11]))  # rank 0's half of 2 views x 8 samples
    draws = {}
    for rank in ("0", "1", "0"):
        monkeypatch.setenv("RANK", rank)
        torch.manual_seed(0)
        patches = augmented_views(frames, where, 7, augment, columns)
        draws.setdefault(rank, []).append((patches, torch.rand(1)))
    (zero, after_zero), (again, _), (one, after_one) = draws["0"][0], draws["0"][1], draws["1"][0]
    torch.testing.assert_close(zero, again)  # a seed still decides a run
    assert not torch.allclose(zero, one)
    assert torch.equal(after_zero, after_one)
    assert not torch.allclose(augmented_views(frames, where, 7, augment, columns), zero)  # the next step draws anew
