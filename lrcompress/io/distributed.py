"""torchrun support: rank/world size, initialising the process group (explicitly, never as a
side effect of a query), small all-reduces and the tear-down at exit."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the live process group, else as torchrun's environment says; a pure
    query (see ``init_distributed``)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1), initialise the process group once; returns (rank, world size)."""
    import torch
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("LRCOMPRESS_DEVICE", "cpu") != "cpu" else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    import torch
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_min(value: float, device: torch.device) -> float:
    import torch
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t)


def shutdown(sync: bool = True) -> None:
    """Destroy the torchrun process group before the interpreter exits.

    A gloo group left alive aborts the process at exit ("terminate called without an active
    exception") once its worker threads outlive the interpreter. With ``sync`` every rank first
    waits for the others, so no rank leaves while rank 0 is still writing; on an error path pass
    ``sync=False`` (torchrun stops the other ranks). A no-op outside torchrun.
    """
    import sys
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        if sync:
            dist.barrier()
    finally:
        dist.destroy_process_group()
