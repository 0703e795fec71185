"""Data-parallel runs under ``torchrun``: process group set-up, rank queries, batch sharding.

Everything goes through ``torch.distributed`` (NCCL on CUDA, gloo on CPU); a plain single
process needs no set-up and every helper here is then a no-op.
"""
from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (if any); returns this rank's device."""
    if not launched_by_torchrun() or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(leave_process_group)
    return device


def leave_process_group() -> None:
    """Destroy the process group (registered at exit by :func:`init_distributed`). Left to the
    interpreter's teardown, gloo's worker threads can abort a rank at exit ("terminate called without
    an active exception", pytorch/pytorch#190489)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (torchrun's ``RANK`` before the process group is joined)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Only rank 0 writes files."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (the batch size must divide evenly)."""
    if not dist.is_initialized():
        return batch
    return batch.chunk(world_size())[rank()]
