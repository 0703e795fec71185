"""Crash-safe resume: a run stopped at any moment continues bit for bit."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from contrastive_lw.checkpoint import BACKBONE, load_checkpoint
from contrastive_lw.model import ArchConfig
from contrastive_lw.pretrain import LayerwisePretrainer, PretrainConfig


def _config(**kw):
    return PretrainConfig(arch=ArchConfig(widths=(4, 6)), steps_per_layer=6, save_every=2, batch_size=16,
                          log_every=1, **kw)


def _weights(run):
    return load_checkpoint(run / "layer2.pt", BACKBONE)["backbone"]


class _CrashAt(torch.nn.Module):
    """Wraps a loss and raises at its ``at``-th call, as a crash would."""

    def __init__(self, loss, at):
        super().__init__()
        self.loss, self.at, self.uses_negatives = loss, at, loss.uses_negatives
        self.compares_all_pairs = getattr(loss, "compares_all_pairs", False)  # InfoNCE (the default): same path

    def forward(self, *embeddings):
        self.at -= 1
        if self.at == 0:
            raise RuntimeError("simulated crash")
        return self.loss(*embeddings)


@pytest.mark.parametrize("crash_at", [4, 9])   # inside layer 1, inside layer 2
def test_resumed_run_is_bit_identical(tmp_path, images, crash_at):
    LayerwisePretrainer(_config(), tmp_path / "straight", "cpu", progress=False).fit(images)
    crashing = LayerwisePretrainer(_config(), tmp_path / "resumed", "cpu", progress=False)
    crashing.loss_fn = _CrashAt(crashing.loss_fn, crash_at)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.fit(images)
    assert (tmp_path / "resumed" / "state.pt").is_file()
    LayerwisePretrainer(_config(), tmp_path / "resumed", "cpu", progress=False).fit(images)
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert not (tmp_path / "resumed" / "state.pt").exists()


def test_state_of_another_config_is_refused(tmp_path, images):
    trainer = LayerwisePretrainer(_config(), tmp_path, "cpu", progress=False)
    trainer.loss_fn = _CrashAt(trainer.loss_fn, 4)
    with pytest.raises(RuntimeError):
        trainer.fit(images)
    from contrastive_lw.errors import CheckpointError

    with pytest.raises(CheckpointError, match="state.pt"):
        LayerwisePretrainer(_config(lr=0.01), tmp_path, "cpu", progress=False).fit(images)


def test_state_saved_with_one_int_of_steps_resumes(tmp_path, images):
    """A state.pt written before ``steps_per_layer`` was per layer (one int) still resumes."""
    from contrastive_lw.checkpoint import save_checkpoint
    from contrastive_lw.pretrain import TRAIN_STATE

    trainer = LayerwisePretrainer(_config(), tmp_path, "cpu", progress=False)
    trainer.loss_fn = _CrashAt(trainer.loss_fn, 4)
    with pytest.raises(RuntimeError):
        trainer.fit(images)
    state = load_checkpoint(tmp_path / "state.pt", TRAIN_STATE)
    state["config"]["steps_per_layer"] = 6
    save_checkpoint(state, tmp_path / "state.pt")
    LayerwisePretrainer(_config(), tmp_path, "cpu", progress=False).fit(images)
    assert not (tmp_path / "state.pt").exists()


def _command(npz, out):
    return [sys.executable, "-m", "contrastive_lw", "pretrain", "--dataset", f"npz:{npz}", "--widths", "4",
            "--steps-per-layer", "300", "--batch-size", "32", "--no-progress", "--out", str(out),
            "--config", str(npz.parent / "save.yaml")]


@pytest.fixture
def npz(tmp_path, images):
    path = tmp_path / "images.npz"
    np.savez(path, images=images.numpy())
    (tmp_path / "save.yaml").write_text("pretrain:\n  save_every: 10\n  log_every: 10\n")
    return path


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _start_and_wait_for_state(npz, out):
    process = subprocess.Popen(_command(npz, out), env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "state.pt").exists():
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    return process


def test_sigkill_mid_layer_then_resume(tmp_path, npz):
    subprocess.run(_command(npz, tmp_path / "straight"), env=_env(), check=True)
    process = _start_and_wait_for_state(npz, tmp_path / "killed")
    process.kill()
    process.wait()
    assert not (tmp_path / "killed" / "layer1.pt").exists()
    subprocess.run(_command(npz, tmp_path / "killed"), env=_env(), check=True)
    straight = load_checkpoint(tmp_path / "straight" / "layer1.pt", BACKBONE)["backbone"]
    resumed = load_checkpoint(tmp_path / "killed" / "layer1.pt", BACKBONE)["backbone"]
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_sigterm_saves_state_and_exits(tmp_path, npz):
    process = _start_and_wait_for_state(npz, tmp_path / "run")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "run the same command again" in err
    assert load_checkpoint(tmp_path / "run" / "state.pt", "contrastive-lw/train-state")["step"] > 0
