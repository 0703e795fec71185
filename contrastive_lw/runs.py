"""Run directories: the saved config, metrics.jsonl and TensorBoard events."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .config import load_yaml, save_yaml
from .distributed import is_main_process
from .errors import UserError


def prepare_run_dir(out: str | Path, config: dict[str, Any], force: bool = False) -> Path:
    """Create ``out`` and save ``config`` as its ``config.yaml``.

    Re-using a directory continues the run there (resume) and so requires the same config;
    ``force`` overwrites the saved config instead.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory: choose another --out")
    saved = out / "config.yaml"
    if saved.exists() and not force:
        previous = load_yaml(saved)
        if previous != config:
            changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
            raise UserError(f"{out} holds a run with a different config (differs in {changed}): "
                            "use a new --out, or --force to continue with the new config")
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        save_yaml(config, saved)
    return out


class RunLogger:
    """Appends metric rows to ``metrics.jsonl`` and mirrors them to TensorBoard under ``tb/``.
    ``write=False`` makes every call a no-op; by default only rank 0 of a distributed run writes."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, write: bool | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.metrics, self.writer = None, None
        if not (is_main_process() if write is None else write):
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = (self.run_dir / "metrics.jsonl").open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))

    def log(self, step: int, values: dict[str, Any], prefix: str = "") -> None:
        """One metrics row ``{step, **values}``; numeric values also go to TensorBoard."""
        if self.metrics is None:
            return
        row = {"step": step, **values}
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}{key}", value, step)

    def image(self, tag: str, image: torch.Tensor, step: int = 0) -> None:
        """A C x H x W image in [0, 1] to TensorBoard."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
