"""The one distributed-world helper: which process this is, how many there are, and the two object collectives the
stores use (rank 0 decides, every rank gets its decision; every rank's results, gathered)."""

from __future__ import annotations

import os


def world(from_env: bool = False) -> tuple[int, int]:
    """`(rank, world_size)` of the initialized process group, else `(0, 1)`.

    `from_env=True` falls back to the launcher's `RANK` / `WORLD_SIZE` variables when no group is initialized
    (work split across processes that never communicate, such as sharded captioning).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if from_env:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return 0, 1


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (every rank must call this)."""
    if world()[1] == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (every rank must call this)."""
    world_size = world()[1]
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
