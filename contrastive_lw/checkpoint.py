"""Atomic checkpoint files with a format version, and loading a pretrained backbone from them."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any, BinaryIO

import torch

from .errors import CheckpointError

FORMAT_VERSION = 1
BACKBONE = "contrastive-lw/backbone"


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file atomically: ``write`` fills a temporary file beside ``path``, which is then
    fsynced and renamed over it (and the folder fsynced). A crash leaves either the old file or
    the new one, never half of one, and no temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts) atomically (:func:`write_atomic`)
    with the format version."""
    write_atomic(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **payload}, f))


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global RNG states a resumable loop must save: the CPU's, and the device's on CUDA."""
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` saved (a file without the CUDA state keeps the current one)."""
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def load_checkpoint(path: str | Path, kind: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint of ``kind`` safely (``weights_only=True``).

    Raises:
        CheckpointError: the file is missing, truncated, not a contrastive-lw checkpoint, of
            another kind, or written by a newer format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many kinds for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}): it is "
                              "truncated or another kind of file; delete it to retrain that layer, "
                              "or point to the right file") from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path} is not a contrastive-lw checkpoint")
    if payload["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format {payload['format_version']}, newer than this "
                              f"contrastive-lw reads ({FORMAT_VERSION}): upgrade contrastive-lw")
    if payload.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {payload.get('kind')!r} checkpoint, not a {kind!r} one")
    return payload


def save_backbone(path: str | Path, net, mode: str, trained_blocks: int | None = None, **extra: Any) -> None:
    """Save a backbone (:class:`~contrastive_lw.blocks.BlockNet`) of which the first ``trained_blocks``
    (default: all) are trained, with what rebuilds it (``backbone_spec``; ``arch`` too for the
    ``lw`` net, as format-1 readers expect), how it was trained (``greedy``, ``end2end``,
    ``supervised``) and ``extra`` entries."""
    spec = net.spec
    save_checkpoint({"kind": BACKBONE, "backbone_spec": spec, **({"arch": spec["arch"]} if "arch" in spec else {}),
                     "trained_blocks": trained_blocks or net.num_blocks,
                     "mode": mode, "backbone": {n: t.detach().cpu() for n, t in net.state_dict().items()},
                     **extra}, path)


def saved_spec(payload: dict[str, Any]) -> dict[str, Any]:
    """The backbone description of a backbone checkpoint (files without one hold the ``lw`` net)."""
    return payload.get("backbone_spec") or {"name": "lw", "arch": payload["arch"]}


def layer_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """The finished-layer checkpoints ``layerK.pt`` of a run directory, by K."""
    found = {}
    for path in Path(run_dir).glob("layer*.pt"):
        match = re.fullmatch(r"layer(\d+)\.pt", path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def deepest_layer(run_dir: str | Path) -> Path | None:
    """The checkpoint of the deepest finished layer of a run directory (None: no finished layer)."""
    layers = layer_checkpoints(run_dir)
    return layers[max(layers)] if layers else None


def load_backbone(source: str | Path, map_location: str | torch.device = "cpu"):
    """The pretrained backbone (:class:`~contrastive_lw.blocks.BlockNet`: the ``lw`` net or a
    torchvision one, rebuilt from the checkpoint's description) in a checkpoint file or in a run
    directory (its deepest finished layer), holding the trained blocks only.

    Example:
        >>> net = load_backbone("runs/demo")          # doctest: +SKIP
        >>> net.receptive_field(3)                    # doctest: +SKIP
        25
    """
    from .backbones import backbone_from_spec

    source = Path(source)
    if source.is_dir():
        deepest = deepest_layer(source)
        if deepest is None:
            raise CheckpointError(f"{source} holds no finished layer (layerK.pt): pretrain first")
        source = deepest
    payload = load_checkpoint(source, BACKBONE, map_location)
    net = backbone_from_spec(saved_spec(payload))
    try:
        net.load_state_dict(payload["backbone"])
    except RuntimeError as err:
        raise CheckpointError(f"{source}: weights do not match its architecture ({str(err).splitlines()[0]})") from None
    return net.prefix(payload["trained_blocks"])
