"""The one distributed-world helper: which process this is, and how many there are."""

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
