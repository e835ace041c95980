"""Stage 2's length-grouped order (`trainers.length_groups.LengthGroupedOrder`): a permutation per epoch whose
updates hold rows of similar length, reproducible, and the same rows per update however the update is split."""

import pytest
import torch

from trainers.length_groups import LengthGroupedOrder


def _lengths(n=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    by_epoch = {}

    def lengths(epoch):  # a row's length may change with the epoch (a new text drawn), as TokenizedTexts' do
        if epoch not in by_epoch:
            by_epoch[epoch] = torch.randint(3, 60, (n,), generator=g)
        return by_epoch[epoch]

    return lengths


def _padded(order, lengths, group):
    """Tokens the batches of `order` pad to, per row."""
    full = len(order) // group * group
    return lengths[order[:full]].view(-1, group).max(1).values.float().mean().item()


def test_each_epoch_is_a_permutation_of_the_rows_with_short_and_long_updates_apart():
    lengths = _lengths()
    sampler = LengthGroupedOrder(lengths, 1000, group_size=32, seed=1, groups_per_bucket=10)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        assert sorted(order.tolist()) == list(range(1000))
        grouped = _padded(order, lengths(epoch), 32)
        shuffled = _padded(torch.randperm(1000), lengths(epoch), 32)
        assert grouped < 0.75 * shuffled, (grouped, shuffled)  # ~58 tokens per row at random, ~40 here
        # each update's rows come from one sorted bucket: their length range is narrow
        spans = [(b.max() - b.min()).item() for b in lengths(epoch)[order[:992]].view(-1, 32)]
        assert sorted(spans)[len(spans) // 2] <= 10


def test_the_order_is_reproducible_by_seed_and_new_each_epoch():
    lengths = _lengths()
    a = LengthGroupedOrder(lengths, 1000, 32, seed=1)
    b = LengthGroupedOrder(lengths, 1000, 32, seed=1)
    assert torch.equal(a.order(0), b.order(0)) and torch.equal(a.order(2), b.order(2))
    assert not torch.equal(a.order(0), a.order(1))
    assert not torch.equal(a.order(0), LengthGroupedOrder(lengths, 1000, 32, seed=2).order(0))


def test_the_incomplete_update_comes_last_and_updates_do_not_straddle_groups():
    """1000 rows in updates of 48: 20 full updates, then the 40 left over (which drop_last drops) — never in the
    middle, where it would shift every later update off its group."""
    lengths = torch.arange(1000) % 7  # seven lengths: many ties; buckets of 192 rows
    order = LengthGroupedOrder(lambda e: lengths, 1000, 48, seed=0, groups_per_bucket=4).order(0)
    for update in [*order[:960].view(20, 48), order[960:]]:  # a slice of one sorted bucket each, the 40 left last
        ranked = lengths[update]
        assert torch.equal(ranked, ranked.sort().values)
    assert sorted(order.tolist()) == list(range(1000))


def test_equal_lengths_give_a_plain_shuffle():
    order = LengthGroupedOrder(lambda e: torch.full((200,), 77), 200, 16, seed=0).order(0)
    assert sorted(order.tolist()) == list(range(200)) and order.tolist() != list(range(200))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="group_size and groups_per_bucket must be >= 1"):
        LengthGroupedOrder(lambda e: torch.zeros(4), 4, 0)
    with pytest.raises(ValueError, match=r"expected \(5,\)"):
        LengthGroupedOrder(lambda e: torch.zeros(4), 5, 2).order(0)


def test_one_update_per_bucket_keeps_random_updates_and_sorts_only_their_micro_batches():
    """`groups_per_bucket=1`: which rows share an update does not depend on the texts' lengths (the updates of a
    random order), and within each update the rows come shortest first, so that its gradient-accumulation
    micro-batches (consecutive slices of it) each pad to their own longest text."""
    n, group = 960, 32
    short_first = torch.arange(n) % 57 + 3
    updates = {}
    for name, lengths in (("short first", short_first), ("reversed", short_first.flip(0))):
        order = LengthGroupedOrder(lambda epoch, lengths=lengths: lengths, n, group_size=group, seed=3,
                                   groups_per_bucket=1).order(0).view(-1, group)
        assert all(torch.equal(lengths[u], lengths[u].sort().values) for u in order)  # sorted within each update
        updates[name] = {frozenset(u.tolist()) for u in order}
    assert updates["short first"] == updates["reversed"]
    grouped = LengthGroupedOrder(lambda epoch: short_first, n, group_size=group, seed=3, groups_per_bucket=10)
    assert {frozenset(u.tolist()) for u in grouped.order(0).view(-1, group)} != updates["short first"]
    # the micro-batches of 4 accumulation steps pad less than the update would as one batch
    order = LengthGroupedOrder(lambda epoch: short_first, n, group_size=group, seed=3, groups_per_bucket=1).order(0)
    assert _padded(order, short_first, group // 4) < _padded(order, short_first, group)
