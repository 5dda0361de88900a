"""A batch's way onto the training device, run in a background thread a batch ahead (``data.stage``).

What the training process does to each batch before the step can use it: pin the worker's uint8
views, copy them to the device and normalise them, or with ``data.decode=gpu`` decode the JPEGs
with nvJPEG and make the views. Run in the training thread, that host time stops the dispatch of
the step: the device idles and the loop counts it as data wait. torchvision's nvJPEG decode is the
worst case, since it returns only after the whole batch is decoded (it synchronises its stream).
Here a thread does it while the training thread queues the step: torch's operators (the decode
included) release the GIL while they run.

Order on the device: the thread queues its work on a stream of its own and records an event after
each batch; the consumer's stream waits for that event before it touches the batch, and
``record_stream`` keeps the batch's memory out of the thread's pool until the consumer's queued work
on it has run. Which batches come, and in which order, is the source's: the thread only maps them.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator

import torch

log = logging.getLogger("mimscale.data")

_END = object()
_JOIN_S = 60.0  # a close waits this long for the thread (it may be waiting for a loader worker)


class StagedBatches:
    """``prepare(item)`` for each item of ``items``, computed in a background thread at most
    ``ahead`` batches ahead of the consumer (one more in progress), handed out in order; an error
    of ``items`` or ``prepare`` is raised at its place in the sequence. ``close()`` stops the
    thread (a consumer that stops early must call it); ``items`` is iterated, and dropped, by the
    thread only."""

    def __init__(self, items: Iterator, prepare: Callable, device: torch.device | str, ahead: int = 1):
        device = torch.device(device)
        self._index = None
        if device.type == "cuda":  # the current device is per thread: the thread takes the caller's
            self._index = torch.cuda.current_device() if device.index is None else device.index
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(items, prepare), daemon=True,
                                        name="mimscale-data-stage")
        self._thread.start()

    def _put(self, entry) -> bool:
        """Queue ``entry`` unless the consumer stopped; whether it was queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator, prepare: Callable) -> None:
        try:
            with _thread_stream(self._index) as stream:
                for item in items:
                    out = prepare(item)
                    event = None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not self._put((out, event, None)):
                        return
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put((None, None, e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
            del items  # a DataLoader iterator shuts its workers down when dropped

    def __iter__(self) -> StagedBatches:
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        entry = self._queue.get()
        if entry is _END:
            self._done = True
            raise StopIteration
        out, event, error = entry
        if error is not None:
            self._done = True
            raise error
        if event is not None:
            current = torch.cuda.current_stream(self._index)
            current.wait_event(event)
            for t in _device_tensors(out):
                t.record_stream(current)
        return out

    def close(self) -> None:
        """Stop the thread and drop what it prepared."""
        self._done = True
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join(_JOIN_S)
        if self._thread.is_alive():
            log.warning("data: the staging thread did not stop within %.0f s; left behind (daemon)", _JOIN_S)


@contextlib.contextmanager
def _thread_stream(index: int | None):
    """The thread's own CUDA stream (on the consumer's device) as its current stream; None on a CPU."""
    if index is None:
        yield None
        return
    with torch.cuda.device(index):
        stream = torch.cuda.Stream(index)
        with torch.cuda.stream(stream):
            yield stream


def _device_tensors(obj):
    """The CUDA tensors of a batch: its values, and the tensors of its list or tuple values."""
    values = obj.values() if isinstance(obj, dict) else [obj]
    for v in values:
        for t in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(t, torch.Tensor) and t.is_cuda:
                yield t


def staged(items: Iterator, prepare: Callable, device, thread: bool) -> Iterator:
    """``prepare`` mapped over ``items``: in a ``StagedBatches`` thread, or inline. The caller
    closes the result (``close()`` exists either way)."""
    if thread:
        return StagedBatches(items, prepare, device)
    return _Inline(items, prepare)


class _Inline:
    def __init__(self, items: Iterator, prepare: Callable):
        self._items, self._prepare = items, prepare

    def __iter__(self):
        return self

    def __next__(self):
        return self._prepare(next(self._items))

    def close(self) -> None:
        close = getattr(self._items, "close", None)
        if close is not None:
            close()
