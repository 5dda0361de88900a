"""A resume on another layout (ranks, loader workers, batch size) finishes the epoch exactly: the
samples not read yet are split over the new layout, each read once, then the next epoch is as
usual. The plan-level cases cover many layouts and two changes in one epoch; the loader cases run
real loader workers (2 -> 3). Ranks in real process groups: test_data_resplit_ranks.py."""

import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from mimscale.data_pipeline.loader import PretrainLoader
from mimscale.data_pipeline.plan import EpochPlan
from mimscale.data_pipeline.resplit import Stretch, rest_of_epoch
from mimscale.data_pipeline.sources.imagefolder import ImageFolderSource
from mimscale.data_pipeline.synthetic import write_imagefolder
from mimscale.data_pipeline.views import mae_views

SIZES, SEED, EPOCH = [5, 7, 4, 8, 6], 3, 2  # 30 samples


def planned(world, workers, batch, remainder="drop"):
    return EpochPlan(SIZES, batch, SEED, world, remainder), workers


def read_before(plan, workers, batches):
    """Sample ids every rank read in its first ``batches`` batches of EPOCH, by the plan's own
    per-batch positions (independent of resplit's arithmetic)."""
    ids = plan.epoch_ids(EPOCH)
    return [int(i) for r in range(plan.world_size) for b in range(batches)
            for i in ids[plan.batch_positions(EPOCH, r, b, workers)]]


def read_rest(rest: Stretch, workers, upto=None):
    """Sample ids of the rest's batches, gathered batch by batch from every rank's worker shares;
    ``upto``: only the first ``upto`` batches of each rank. Checks every batch number appears once."""
    out, numbers = [], []
    for r in range(rest.world_size):
        for w in range(max(1, workers)):
            _, batches, idx = rest.share(r, w, workers)
            for j, b in enumerate(batches):
                numbers.append((r, int(b)))
                if upto is None or b < upto:
                    out += rest.ids[idx[j * rest.batch_size:(j + 1) * rest.batch_size]].tolist()
    assert sorted(numbers) == [(r, b) for r in range(rest.world_size) for b in range(rest.steps)]
    return out


LAYOUTS = [(2, 2, 3), (1, 1, 3), (1, 3, 3), (3, 2, 2), (2, 3, 5), (1, 2, 5)]


@pytest.mark.parametrize("old,new", [(a, b) for a, b in itertools.permutations(LAYOUTS, 2)])
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_rest_of_epoch_reads_each_sample_once(old, new, remainder):
    before, workers = planned(*old, remainder)
    after, new_workers = planned(*new, remainder)
    for b in sorted({1, before.steps_per_epoch // 2, before.steps_per_epoch - 1} - {0}):
        read = read_before(before, workers, b)
        part = {"world_size": old[0], "workers": old[1], "batch_size": old[2], "remainder": remainder, "batches": b}
        rest = rest_of_epoch(after, EPOCH, [part])
        counts = Counter(read + (read_rest(rest, new_workers) if rest is not None else []))
        left = 30 - len(set(read))
        unit = new[0] * new[2]
        if remainder == "drop":  # never twice; only fewer than one batch of every new rank left out
            assert max(counts.values()) == 1 and 30 - len(counts) == left % unit
        else:  # all once; repeats only of what padding read before or pads now
            assert set(counts) == set(range(30))
            assert sum(counts.values()) - 30 == (len(read) - len(set(read))) + (-left) % unit


def test_two_changes_in_one_epoch_still_read_each_sample_once():
    """2 ranks x 2 workers read 2 batches; 3 ranks x 1 worker read 1 batch of the rest; 1 rank x 3
    workers read the remainder: every sample of the epoch once (30 = 2*2*3 + 3*1*2 + 12)."""
    first, _ = planned(2, 2, 3)
    parts = [{"world_size": 2, "workers": 2, "batch_size": 3, "remainder": "drop", "batches": 2}]
    second = rest_of_epoch(planned(3, 1, 2)[0], EPOCH, parts)
    assert second.steps == 3
    parts.append({"world_size": 3, "workers": 1, "batch_size": 2, "remainder": "drop", "batches": 1})
    third = rest_of_epoch(planned(1, 3, 3)[0], EPOCH, parts)
    ids = read_before(first, 2, 2) + read_rest(second, 1, upto=1) + read_rest(third, 3)
    assert sorted(ids) == list(range(30))


def test_the_rest_keeps_epoch_order_and_augmentation_positions():
    """What was not read keeps its order and its position in the epoch (which seeds its views)."""
    before, _ = planned(2, 2, 3)
    rest = rest_of_epoch(planned(1, 1, 3)[0], EPOCH, [
        {"world_size": 2, "workers": 2, "batch_size": 3, "remainder": "drop", "batches": 2}])
    order = before.order(EPOCH)
    assert (np.diff(rest.aug) > 0).all() and np.array_equal(rest.ids, order[rest.aug])


def test_nothing_left_or_a_bad_position():
    full = {"world_size": 1, "workers": 1, "batch_size": 5, "remainder": "drop", "batches": 6}
    assert rest_of_epoch(planned(2, 1, 5)[0], EPOCH, [full]) is None  # all 30 read
    with pytest.raises(ValueError, match="batch 7"):
        rest_of_epoch(planned(2, 1, 5)[0], EPOCH, [{**full, "batches": 7}])


# ----------------------------------------------------------------------------- the loader

N, B, IMG = 24, 3, 16


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return ImageFolderSource(write_imagefolder(tmp_path_factory.mktemp("resplit"), N, size=20))


def make(src, workers):
    return PretrainLoader(src, mae_views(IMG), B, seed=0, num_workers=workers)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
def test_loader_two_to_three_workers_finishes_the_epoch_exactly(source):
    """2 workers read 3 batches of epoch 1; 3 workers read its other 5 batches (the rest), each
    sample with the views the 2-worker run gives it, then epoch 2 exactly as a 3-worker run."""
    a = make(source, 2)
    steps = a.steps_per_epoch
    it = iter(a)
    first = [next(it) for _ in range(steps + 3)][steps:]  # epoch 1, batches 0-2
    state = a.state_dict()
    assert (state["epoch"], state["batch_in_epoch"], state["workers"]) == (1, 3, 2)
    uninterrupted = {int(i): img for bt in (next(it) for _ in range(steps - 3))
                     for i, img in zip(bt["index"].tolist(), bt["images"])}
    it.close()

    b = make(source, 3)
    b.load_state_dict(state)
    assert b.state_dict()["earlier"][0]["workers"] == 2
    it = iter(b)
    rest = [next(it) for _ in range(steps - 3)]
    assert [(x["epoch"], x["batch"]) for x in rest] == [(1, j) for j in range(steps - 3)]
    assert {x["worker"] for x in rest} == {0, 1, 2}
    ids = [i for x in first + rest for i in x["index"].tolist()]
    assert sorted(ids) == list(range(N))  # every sample of the epoch exactly once
    for x in rest:
        for i, img in zip(x["index"].tolist(), x["images"]):
            assert torch.equal(img, uninterrupted[i])
    assert b.state_dict()["epoch"] == 2 and b.state_dict()["earlier"] == []

    nxt = [next(it) for _ in range(steps)]
    it.close()
    fresh = make(source, 3)
    fresh.load_state_dict({**fresh.state_dict(), "epoch": 2})
    expected = list(itertools.islice(iter(fresh), steps))
    assert [x["index"].tolist() for x in nxt] == [x["index"].tolist() for x in expected]
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(nxt, expected))
    assert sorted(i for x in nxt for i in x["index"].tolist()) == list(range(N))


def test_loader_position_inside_a_rest_survives_another_change(source):
    """A checkpoint written during a rest, resumed on a third layout, still ends the epoch exactly."""
    a = make(source, 0)
    first = list(itertools.islice(iter(a), 2))
    b = make(source, 2)
    b.load_state_dict(a.state_dict())
    second = list(itertools.islice(iter(b), 2))
    state = b.state_dict()
    assert (state["batch_in_epoch"], len(state["earlier"])) == (2, 1)
    same = make(source, 2)  # the same layout resumes inside the rest
    same.load_state_dict(state)
    c = PretrainLoader(source, mae_views(IMG), 4, seed=0)  # and another batch size too
    c.load_state_dict(state)
    third = list(itertools.islice(iter(c), c.rest.steps))
    ids = [i for x in first + second + third for i in x["index"].tolist()]
    assert Counter(ids).most_common(1)[0][1] == 1 and len(ids) == 24 - (24 - 12) % 4
    assert [x["index"].tolist() for x in itertools.islice(iter(same), 2)] == \
        [x["index"].tolist() for x in itertools.islice(iter(b), 2)]


def test_other_data_still_starts_the_next_epoch(source, caplog):
    a = make(source, 0)
    list(itertools.islice(iter(a), 2))
    b = make(source, 0)
    with caplog.at_level("WARNING", logger="mimscale.data"):
        b.load_state_dict({**a.state_dict(), "num_samples": 30})
    assert "num_samples 30 -> 24" in caplog.text and (b.epoch, b.batch_in_epoch, b.rest) == (1, 0, None)
