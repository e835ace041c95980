"""Stage 2's batch order: the rows of one optimizer update drawn from a bucket of similar text length.

In stage 2 every query is scored against the whole frozen bank, so which queries share a batch changes no query's
loss (in stage 1 the batch *is* the negatives, and this order is not used there). Rows of similar tokenized length
in one batch pad less, and the text tower — the step's cost — reads fewer padded tokens. What changes is the order
of the updates (which rows are averaged into one gradient), not any row's loss or how often it is seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


class LengthGroupedOrder(Sampler[int]):
    """
    A per-epoch permutation of the rows in which every `group_size` consecutive rows (one optimizer update: per-device
    batch x processes x gradient-accumulation steps) have similar lengths.

    Each epoch: the rows are shuffled; cut into buckets of `group_size * groups_per_bucket` rows; each bucket is sorted
    by length (ties keep the shuffled order) and cut into groups of `group_size`; the full groups of all buckets are
    shuffled, and the one incomplete group (if the rows do not divide) comes last, where `dataloader_drop_last` drops
    it as it drops the last incomplete batch of a random order. Every row appears once per epoch.

    The order is a pure function of `(seed, epoch, lengths, group_size)`: the same on every rank (which take their
    batches from it as from any sampler), the same for 1 process x batch 8 as for 2 processes x batch 2 x 2
    accumulation steps (the same rows in each update), and the same after a resume.

    Args:
        lengths: `lengths(epoch)` -> `[num_rows]` the tokens each row's text has in that epoch
            (`TokenizedTexts.row_lengths`).
        num_rows: rows of the dataset.
        group_size: rows per optimizer update.
        seed: the run's seed (`data_seed` or `seed`).
        groups_per_bucket: groups sorted together; fewer keeps more of the random mixing, more pads less.
    """

    def __init__(self, lengths: Callable[[int], torch.Tensor], num_rows: int, group_size: int, seed: int = 0,
                 groups_per_bucket: int = 50):
        if group_size < 1 or groups_per_bucket < 1:
            raise ValueError(f"group_size and groups_per_bucket must be >= 1, got {group_size}, {groups_per_bucket}.")
        self.lengths, self.num_rows, self.group_size = lengths, num_rows, group_size
        self.seed, self.groups_per_bucket = seed, groups_per_bucket
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_rows

    def order(self, epoch: int) -> torch.Tensor:
        """`[num_rows]` the rows in the order of `epoch`."""
        lengths = torch.as_tensor(self.lengths(epoch))
        if lengths.shape != (self.num_rows,):
            raise ValueError(f"lengths(epoch) gave shape {tuple(lengths.shape)}, expected ({self.num_rows},).")
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        shuffled = torch.randperm(self.num_rows, generator=generator)
        span = self.group_size * self.groups_per_bucket
        groups = []
        for start in range(0, self.num_rows, span):
            bucket = shuffled[start:start + span]
            bucket = bucket[torch.sort(lengths[bucket], stable=True).indices]
            groups.extend(bucket.split(self.group_size))
        full = [g for g in groups if len(g) == self.group_size]
        partial = [g for g in groups if len(g) < self.group_size]
        mixed = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return torch.cat(mixed + partial) if groups else shuffled

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch).tolist())
