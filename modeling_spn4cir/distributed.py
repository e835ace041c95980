"""The one distributed-world helper: which process this is and how many there are; the object collectives the
stores use (rank 0 decides, every rank gets its decision; every rank's results, gathered); and the gathers every
loss uses (small pure functions, as open_clip's)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world(from_env: bool = False) -> tuple[int, int]:
    """`(rank, world_size)` of the initialized process group, else `(0, 1)`.

    `from_env=True` falls back to the launcher's `RANK` / `WORLD_SIZE` variables when no group is initialized
    (work split across processes that never communicate, such as sharded captioning).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if from_env:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return 0, 1


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (every rank must call this)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (every rank must call this)."""
    world_size = world()[1]
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """All-gather `[B_r, ...]` (any trailing shape) from every rank into `[sum_r B_r, ...]`, keeping the autograd graph: the
    backward pass sums every rank's gradient for this rank's slice (a plain `all_gather` returns tensors
    without history, so the other ranks' loss terms would silently not reach this rank's parameters).
    Returns the gathered tensor and the per-rank sizes (ranks may hold uneven batches)."""
    rank, world_size = world()
    if world_size == 1:
        return tensor, [tensor.shape[0]]
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    padded = F.pad(tensor, (0,) * (2 * (tensor.ndim - 1)) + (0, max(sizes) - tensor.shape[0]))
    from torch.distributed._functional_collectives import all_gather_single_autograd

    gathered = all_gather_single_autograd(padded.contiguous(), gather_dim=0, group=dist.group.WORLD)
    pieces = gathered.split(max(sizes))
    return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)]), sizes


def ddp_mean_correction(local_size: int, sizes: list[int] | None = None) -> float:
    """Factor that turns this rank's mean loss into its share of the *global* mean under DDP, which averages
    gradients over ranks: `B_local * W / B_global` (1 with even batches or one process). Without it, a rank with
    3 rows would weigh as much as one with 5."""
    _, world_size = world()
    if world_size == 1:
        return 1.0
    sizes = batch_sizes(local_size) if sizes is None else sizes
    return local_size * world_size / sum(sizes)


def batch_sizes(local_size: int) -> list[int]:
    """Every rank's batch size, in rank order (`[local_size]` on one process)."""
    _, world_size = world()
    if world_size == 1:
        return [local_size]
    size = torch.tensor([local_size])
    gathered = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(gathered, size)
    return [int(s) for s in gathered]


def gather_no_grad(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All-gather a tensor without gradient (e.g. target keys), given the per-rank sizes."""
    if len(sizes) == 1:
        return tensor
    padded = F.pad(tensor, (0, max(sizes) - tensor.shape[0]))
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:n] for o, n in zip(out, sizes)])
