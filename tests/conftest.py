import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tests never write to the user's dataset cache."""
    monkeypatch.setenv("CONTRASTIVE_LW_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def images() -> torch.Tensor:
    """64 random-but-structured uint8 images 3 x 32 x 32 (smooth blobs, so patches differ)."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(64, 3, 8, 8, generator=g)
    return (torch.nn.functional.interpolate(low, size=32, mode="bilinear") * 255).to(torch.uint8)


@pytest.fixture
def write_npz(tmp_path, images) -> Callable[..., Path]:
    """``write_npz(classes, channels_last=False)``: the ``images`` fixture with labels ``index % classes``
    written to ``tmp_path/images.npz`` (N x C x H x W, or N x H x W x C); returns its path."""
    def write(classes: int, channels_last: bool = False) -> Path:
        path = tmp_path / "images.npz"
        np.savez(path, images=(images.permute(0, 2, 3, 1) if channels_last else images).numpy(),
                 labels=np.arange(len(images)) % classes)
        return path
    return write


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (selected by experiments/gpu_check.py: -m cuda)")


def pytest_collection_modifyitems(items):
    """Every test skipped for want of CUDA is also marked ``cuda``, so ``pytest -m cuda`` runs them all."""
    for item in items:
        if any("CUDA" in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)
