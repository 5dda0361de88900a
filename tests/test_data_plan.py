"""EpochPlan: the two-level order, remainders, and the exactly-once split over ranks x workers."""

from collections import Counter

import numpy as np
import pytest

from mimscale.data_pipeline.loader import EpochSampler
from mimscale.data_pipeline.plan import EpochPlan

SIZES = [7, 0, 5, 9, 3]  # uneven shards, one empty


def test_order_is_a_shard_grouped_permutation():
    plan = EpochPlan(SIZES, batch_size=2)
    offsets = np.concatenate([[0], np.cumsum(SIZES)])
    for epoch in range(3):
        order = plan.order(epoch)
        assert sorted(order.tolist()) == list(range(sum(SIZES)))
        shard_of = np.searchsorted(offsets, order, side="right") - 1
        runs = [s for i, s in enumerate(shard_of) if i == 0 or s != shard_of[i - 1]]
        assert len(runs) == len(set(runs)) == 4  # each non-empty shard is one contiguous run
    assert not np.array_equal(plan.order(0), plan.order(1))
    assert np.array_equal(plan.order(2), EpochPlan(SIZES, batch_size=3).order(2))  # layout-free
    assert not np.array_equal(plan.order(0), EpochPlan(SIZES, 2, seed=1).order(0))


@pytest.mark.parametrize("remainder", ["drop", "pad"])
@pytest.mark.parametrize("world,batch,workers", [(2, 2, 2), (3, 2, 2), (2, 3, 3), (1, 4, 1), (2, 1, 4)])
def test_exactly_once_over_ranks_and_workers(remainder, world, batch, workers):
    """Every (rank, batch) slice taken together is the epoch's ids exactly once; each batch comes
    from the worker DataLoader's round robin assigns it, out of that worker's contiguous piece."""
    plan = EpochPlan(SIZES, batch, seed=3, world_size=world, remainder=remainder)
    n, unit = sum(SIZES), world * batch
    expected = n // unit * unit if remainder == "drop" else -(-n // unit) * unit
    assert plan.samples_per_epoch == expected and plan.steps_per_epoch * unit == expected
    for epoch in range(3):
        ids = plan.epoch_ids(epoch)
        order = plan.order(epoch)
        counts = Counter(ids.tolist())
        if remainder == "drop":
            assert ids.tolist() == order[:expected].tolist() and max(counts.values()) == 1
        else:  # every sample, and the first `expected - n` of the order once more
            assert set(counts) == set(range(n))
            assert sorted(k for k, c in counts.items() if c == 2) == sorted(order[: expected - n].tolist())
        seen = []
        for rank in range(world):
            pieces = [plan.worker_piece(epoch, rank, w, workers) for w in range(workers)]
            chunk = plan.rank_slice(rank)
            assert pieces[0].start == chunk.start and pieces[-1].stop == chunk.stop
            assert all(a.stop == b.start for a, b in zip(pieces, pieces[1:]))  # contiguous, in order
            taken = {w: 0 for w in range(workers)}
            for b in range(plan.steps_per_epoch):
                w = (epoch * plan.steps_per_epoch + b) % workers  # DataLoader's round robin
                pos = plan.batch_positions(epoch, rank, b, workers)
                assert pos.start == pieces[w].start + taken[w] * batch  # the worker's next batch
                assert plan.worker_start(epoch, b, w, workers) == taken[w]
                taken[w] += 1
                seen += list(range(pos.start, pos.stop))
            assert all(taken[w] * batch == pieces[w].stop - pieces[w].start for w in taken)
        assert sorted(seen) == list(range(expected))  # each position of the epoch exactly once


def test_worker_batches_partition_each_epoch():
    plan = EpochPlan([10], batch_size=1)
    for epoch in range(4):
        parts = [plan.worker_batches(epoch, w, 3).tolist() for w in range(3)]
        assert sorted(sum(parts, [])) == list(range(10))
        for w, part in enumerate(parts):
            assert all((epoch * 10 + b) % 3 == w for b in part)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="cannot fill one batch of 4 on each of 3 rank"):
        EpochPlan([5, 5], batch_size=4, world_size=3)
    assert EpochPlan([5, 5], batch_size=4, world_size=3, remainder="pad").steps_per_epoch == 1
    with pytest.raises(ValueError, match="remainder 'wrap' is not valid; valid: drop, pad"):
        EpochPlan([5], 1, remainder="wrap")
    with pytest.raises(ValueError, match="non-empty list"):
        EpochPlan([], 1)
    with pytest.raises(ValueError, match="rank 2 outside world_size 2"):
        EpochPlan([8], 1, world_size=2).rank_slice(2)


def test_epoch_sampler_for_map_style_datasets():
    s = EpochSampler(10, seed=0)
    for e in range(3):
        assert sorted(s.indices(e).tolist()) == list(range(10))
    assert not np.array_equal(s.indices(0), s.indices(1))
    s.set_epoch(1, start=4)
    assert list(s) == s.indices(1)[4:].tolist() and len(s) == 6
    for e in range(3):
        r0, r1 = (set(EpochSampler(11, 0, r, 2).indices(e).tolist()) for r in (0, 1))
        assert len(r0) == len(r1) == 5 and not r0 & r1
