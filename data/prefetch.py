"""Background threads that fetch and check shards before the streams reach them.

A stream entering a shard asks for the next shard in its reading order (stream.py). A thread then
fetches it, for a remote dataset, and checks its size and sha256 against the manifest, while the
training process packs rows from the shards it already has. Without this, every shard boundary
stalls the loader for a download and a full read of the shard. On a cold page cache or an object
store, those stalls are most of a loader's time.

The job is the check the reader would run inline (`reader.check_shard`). Its result, or its error,
is applied only when a stream opens the shard, so a corrupt, missing or unreachable shard fails at
the same point in the batches, with the same message, as without prefetching. A job still queued
when its shard is needed is cancelled and run inline instead of waited for.

Threads, not processes, because file reads, downloads and sha256 all release the GIL. The threads
are daemons: a process exits without waiting for shards it will not read.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future


class Prefetcher:
    """`threads` daemon threads running submitted jobs in order; threads start on first use."""

    def __init__(self, threads: int):
        self.threads = threads
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._started = False
        # Threads hold the queue, not this object: when it is dropped, they are told to stop.
        weakref.finalize(self, _stop, self._queue, threads)

    def submit(self, fn: Callable, *args) -> Future:
        if not self._started:
            self._started = True
            for i in range(self.threads):
                threading.Thread(target=_run, args=(self._queue,), daemon=True,
                                 name=f"hymoe-shard-prefetch-{i}").start()
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future


def _run(q: queue.SimpleQueue) -> None:
    while (item := q.get()) is not None:
        future, fn, args = item
        if not future.set_running_or_notify_cancel():  # cancelled: its shard was needed first
            continue
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to whoever opens the shard
            future.set_exception(e)


def _stop(q: queue.SimpleQueue, threads: int) -> None:
    for _ in range(threads):
        q.put(None)
