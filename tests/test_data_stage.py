"""The staging thread (``data.stage=thread``, ``data_pipeline/stage.py``): order, errors at their
place, a consumer that stops early, and on CUDA the consumer's stream waiting for the thread's work.
Through the loader: tests/test_gpu_decode.py (both decode paths, resume) and test_data_loader.py."""

import threading
import time

import pytest
import torch

from mimscale.data_pipeline.build import resolve_stage
from mimscale.data_pipeline.stage import StagedBatches, staged

# on a GPU machine also on CUDA (no CI machine has one: not a skip)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _threads():
    return [t for t in threading.enumerate() if t.name == "mimscale-data-stage" and t.is_alive()]


@pytest.mark.parametrize("thread", [False, True])
def test_items_come_prepared_and_in_order(thread):
    out = staged(iter(range(20)), lambda i: {"i": i, "sq": torch.tensor(i * i)}, "cpu", thread)
    got = [(b["i"], int(b["sq"])) for b in out]
    out.close()
    assert got == [(i, i * i) for i in range(20)]


def test_an_error_is_raised_at_its_place():
    def prepare(i):
        if i == 3:
            raise ValueError("sample 3 is broken")
        return i

    out = StagedBatches(iter(range(10)), prepare, "cpu")
    assert [next(out) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="sample 3 is broken"):
        next(out)
    with pytest.raises(StopIteration):
        next(out)
    out.close()


def test_closing_early_stops_the_thread_and_closes_the_items():
    closed = []

    def items():
        try:
            yield from range(1000)
        finally:
            closed.append(True)

    out = StagedBatches(items(), lambda i: i, "cpu", ahead=2)
    assert next(out) == 0
    time.sleep(0.05)  # the thread runs ahead until the queue is full, then waits
    out.close()
    assert closed == [True] and not _threads()


def test_the_thread_prepares_the_next_item_while_the_consumer_holds_this_one():
    """While the consumer still works on item 0 (it has not asked for item 1), the thread is
    already preparing item 1: its start is seen from the consumer's side."""
    started = [threading.Event() for _ in range(3)]

    def prepare(i):
        started[i].set()
        return i

    out = StagedBatches(iter(range(3)), prepare, "cpu")
    assert next(out) == 0
    assert started[1].wait(timeout=30)  # set by the thread, before the consumer asks for item 1
    assert [next(out), next(out)] == [1, 2]
    out.close()


@pytest.mark.parametrize("device", DEVICES)
def test_the_consumer_sees_the_threads_work_done(device):
    """On CUDA the thread's work is queued on its own stream behind a long kernel: the consumer's
    stream must wait for it (its event) before reading, and the values must be the final ones."""
    def prepare(i):
        x = torch.zeros(1 << 20, device=device)
        if x.is_cuda:
            torch.cuda._sleep(50_000_000)  # the fill below runs only after this kernel
        return {"x": x.fill_(i)}

    out = StagedBatches(iter(range(4)), prepare, device)
    sums = [b["x"].sum() for b in out]
    out.close()
    assert [int(s) for s in sums] == [i * (1 << 20) for i in range(4)]


def test_auto_stages_in_a_thread_only_for_decoding_on_a_gpu():
    assert resolve_stage("auto", "gpu", "cuda") == "thread"
    assert resolve_stage("auto", "cpu", "cuda") == "main"
    assert resolve_stage("auto", "gpu", "cpu") == "main"
    assert resolve_stage("thread", "cpu", "cpu") == "thread"
