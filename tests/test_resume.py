"""Crash-safe resume: a run stopped at any moment continues bit for bit."""
import json
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


def _config(widths=(4, 6), joint_fraction=0.0, **kw):
    return PretrainConfig(arch=ArchConfig(widths=widths), steps_per_layer=6, save_every=2, batch_size=16,
                          log_every=1, joint_fraction=joint_fraction, **kw)


def _weights(run, layer=2):
    return load_checkpoint(run / f"layer{layer}.pt", BACKBONE)["backbone"]


def _same_weights(run_a, run_b, layer=2):
    a, b = _weights(run_a, layer), _weights(run_b, layer)
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


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


@pytest.mark.parametrize("crash_at", [4, 7, 9])   # inside layer 1, between layers 1 and 2, inside layer 2
def test_resumed_run_is_bit_identical(tmp_path, images, crash_at):
    LayerwisePretrainer(_config(), tmp_path / "straight", "cpu", progress=False).fit(images)
    crashing = LayerwisePretrainer(_config(), tmp_path / "resumed", "cpu", progress=False)
    crashing.loss_fn = _CrashAt(crashing.loss_fn, crash_at)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.fit(images)
    assert (tmp_path / "resumed" / "state.pt").is_file() == (crash_at != 7)  # 7: layer 2's first step
    LayerwisePretrainer(_config(), tmp_path / "resumed", "cpu", progress=False).fit(images)
    assert _same_weights(tmp_path / "straight", tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "state.pt").exists()


class _SignalAt(torch.nn.Module):
    """Wraps a loss and, at its ``at``-th call, asks the trainer to stop as SIGTERM's handler does."""

    def __init__(self, trainer, at):
        super().__init__()
        self.trainer, self.loss, self.at, self.uses_negatives = trainer, trainer.loss_fn, at, trainer.loss_fn.uses_negatives
        self.compares_all_pairs = getattr(self.loss, "compares_all_pairs", False)  # the loss's own path

    def forward(self, *embeddings):
        self.at -= 1
        if self.at == 0:
            self.trainer._stop_signal = signal.SIGTERM
        return self.loss(*embeddings)


@pytest.mark.parametrize("stop_at", [1, 3, 6, 7, 12, 18])  # first step, mid-layer, each layer's last step
def test_a_signal_at_any_step_resumes_to_the_uninterrupted_result(tmp_path, images, stop_at):
    """Three layers of 6 steps: stopped at any step (the last step of a layer too, where the layer
    is saved whole and the next starts fresh), the rerun finishes bit-identical, layers 2-3 included."""
    from contrastive_lw.pretrain import Interrupted

    config = _config(widths=(4, 6, 8))
    LayerwisePretrainer(config, tmp_path / "straight", "cpu", progress=False).fit(images)
    stopping = LayerwisePretrainer(config, tmp_path / "resumed", "cpu", progress=False)
    stopping.loss_fn = _SignalAt(stopping, stop_at)
    with pytest.raises(Interrupted):
        stopping.fit(images)
    finished, in_layer = divmod(stop_at, 6)
    assert (tmp_path / "resumed" / "state.pt").exists() == (in_layer != 0)
    assert sorted(p.name for p in (tmp_path / "resumed").glob("layer*.pt")) == [f"layer{k}.pt" for k in range(1, finished + 1)]
    rows_before = len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines())
    LayerwisePretrainer(config, tmp_path / "resumed", "cpu", progress=False).fit(images)
    for layer in (1, 2, 3):
        assert _same_weights(tmp_path / "straight", tmp_path / "resumed", layer)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    continued = [(row["layer"], row["layer_step"]) for row in rows[rows_before:]]
    expected = [(k, step) for k in (1, 2, 3) for step in range(1, 7)][stop_at:]
    assert continued == expected  # the rerun trained exactly the steps the stop had left


@pytest.mark.parametrize("stop_at", [12, 14, 17])  # the last greedy step, inside the joint pass, its last step
def test_a_signal_in_the_joint_pass_resumes_to_the_uninterrupted_result(tmp_path, images, stop_at):
    from contrastive_lw.pretrain import Interrupted

    config = _config(joint_fraction=5 / 6)  # 5 steps after layer 2's 6
    LayerwisePretrainer(config, tmp_path / "straight", "cpu", progress=False).fit(images)
    stopping = LayerwisePretrainer(config, tmp_path / "resumed", "cpu", progress=False)
    stopping.loss_fn = _SignalAt(stopping, stop_at)
    with pytest.raises(Interrupted):
        stopping.fit(images)
    assert (tmp_path / "resumed" / "state.pt").exists() == (stop_at == 14)
    LayerwisePretrainer(config, tmp_path / "resumed", "cpu", progress=False).fit(images)
    for layer in (1, 2):
        assert _same_weights(tmp_path / "straight", tmp_path / "resumed", layer)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["layer_step"] for r in rows if r.get("joint")] == [1, 2, 3, 4, 5]


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


def test_sigterm_saves_its_own_state_and_the_rerun_continues_from_it(tmp_path, npz):
    """No periodic save (save_every beyond the layer): the only state.pt is the one SIGTERM wrote;
    the rerun continues from its step and ends as an uninterrupted run does."""
    (npz.parent / "save.yaml").write_text("pretrain:\n  save_every: 100000\n  log_every: 10\n")
    out = tmp_path / "run"
    process = subprocess.Popen(_command(npz, out), env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    assert not (out / "state.pt").exists()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "run the same command again" in err
    saved = load_checkpoint(out / "state.pt", "contrastive-lw/train-state")["step"]
    assert 10 <= saved < 300 and not (out / "layer1.pt").exists()
    logged = len((out / "metrics.jsonl").read_text().splitlines())
    subprocess.run(_command(npz, out), env=_env(), check=True)
    steps = [json.loads(line)["layer_step"] for line in (out / "metrics.jsonl").read_text().splitlines()[logged:]]
    assert steps == list(range((saved // 10 + 1) * 10, 301, 10))
    subprocess.run(_command(npz, tmp_path / "straight"), env=_env(), check=True)
    assert _same_weights(tmp_path / "straight", out, layer=1)
