"""Opening shards for reading: memory-mapped, checked against the manifest once per process.

A shard is mapped, not read into the heap: documents are numpy views into the page cache, so a
stream holds no token it has not yet copied into a row, whatever the shard or document size, and
the streams of one process that share a shard share its pages. The sha256 of the whole file is
checked the first time a process opens it (or before, by a prefetch thread; prefetch.py); any
mismatch is diagnosed by `manifest.shard_problems`, which names the sample.
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hymoe.data.errors import DataError
from hymoe.data.manifest import shard_problems
from hymoe.data.order import Dataset
from hymoe.data.prefetch import Prefetcher
from hymoe.data.remote import fetch, join, mark_used
from hymoe.data.shards import map_file, member_spans, sha256_file


class CorruptShard(DataError):
    """A shard that does not match its manifest; the message names the shard and the sample."""


@dataclass
class OpenShard:
    tokens: np.ndarray  # the whole file viewed as tokens (read-only, memory-mapped)
    starts: np.ndarray  # int64 [documents]: token offset of each document in `tokens`
    lengths: np.ndarray  # int64 [documents]: tokens in each document

    def doc(self, i: int) -> np.ndarray:
        s = int(self.starts[i])
        return self.tokens[s : s + int(self.lengths[i])]


def check_shard(ds: Dataset, index: int, checked: set) -> tuple[Path, tuple | None]:
    """Shard `index` of `ds` made local (fetched, for a remote dataset) and checked against the
    manifest: (its path, the (path, size, mtime) stamp to remember as checked, or None if `checked`
    holds it already). Raises `CorruptShard` naming the shard and sample, `DataError` if a fetch
    fails. Touches nothing but the shard file, so a prefetch thread can run it."""
    entry = ds.shards[index]
    path = ds.path / entry["name"]
    for attempt in range(2):  # a mirror's copy may be trimmed by another process meanwhile
        if ds.remote and not path.is_file():
            path = fetch(ds.remote, entry["name"])
        try:
            stamp = _stamp(path)
            break
        except FileNotFoundError:
            if not ds.remote or attempt:
                raise CorruptShard(f"{path}: shard missing") from None
    if stamp in checked:
        return path, None
    # Hashed by plain sequential reads (a bounded buffer), not through the mapping; the pages it
    # reads stay in the page cache for the mapping.
    if stamp[1] != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        problems = shard_problems(map_file(path), ds.manifest, index)
        if ds.remote:  # fetched again on the next open: the copy may be what broke
            path.unlink(missing_ok=True)
            raise CorruptShard(f"{join(ds.remote, entry['name'])}: corrupt shard: "
                               f"{'; '.join(problems)}")
        raise CorruptShard(f"{path}: corrupt shard: {'; '.join(problems)}")
    return path, stamp


def _stamp(path: Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return str(path), st.st_size, st.st_mtime_ns


def _unchanged(path: Path, stamp: tuple[str, int, int]) -> bool:
    try:
        return _stamp(path) == stamp
    except OSError:
        return False


class ShardCache:
    """The shards open in this process (LRU), plus what is known to be corrupt.

    Substreams keep a reference to the shard they read, so eviction never closes a shard in use;
    `capacity` only bounds shards that no stream reads any more. With `prefetch_threads`, shards
    asked for by `prefetch` are fetched and checked in the background (prefetch.py).
    """

    def __init__(self, capacity: int = 16, prefetch_threads: int = 0):
        self.capacity = capacity
        self._open: OrderedDict[tuple[str, int], OpenShard] = OrderedDict()
        self._checked: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) hashed OK
        self._corrupt: dict[tuple[str, int], str] = {}
        self._prefetcher = Prefetcher(prefetch_threads) if prefetch_threads > 0 else None
        self._pending: dict[tuple[str, int], Future] = {}
        weakref.finalize(self, _cancel, self._pending)

    def prefetch(self, ds: Dataset, index: int) -> None:
        """Fetch and check shard `index` of `ds` in the background, if it is not open already."""
        key = (str(ds.path), index)
        if self._prefetcher is None or key in self._open or key in self._corrupt or key in self._pending:
            return
        self._pending[key] = self._prefetcher.submit(check_shard, ds, index, self._checked)

    def cancel_prefetch(self) -> None:
        """Drop the background checks not yet started (a stream being closed will not read them)."""
        _cancel(self._pending)
        self._pending.clear()

    def open(self, ds: Dataset, index: int) -> OpenShard:
        """The shard `index` of `ds`, checked; raises `CorruptShard` naming shard and sample."""
        key = (str(ds.path), index)
        if key in self._corrupt:
            raise CorruptShard(self._corrupt[key])
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        entry = ds.shards[index]
        try:
            path, data = self._check_and_map(ds, index, self._pending.pop(key, None))
        except CorruptShard as e:
            self._corrupt[key] = str(e)
            raise
        if ds.remote:
            mark_used(path)  # the mirror's trim deletes the least recently used shards
        starts, sizes = member_spans(data)
        item = ds.np_dtype.itemsize
        tokens = np.frombuffer(data, dtype=ds.np_dtype, count=len(data) // item)
        shard = OpenShard(tokens, starts // item, sizes // item)
        if len(starts) != entry["documents"]:  # sha256 matched, so the manifest itself is off
            message = (f"{path}: holds {len(starts)} samples, manifest says "
                       f"{entry['documents']}; re-run `hymoe data prepare`")
            self._corrupt[key] = message
            raise CorruptShard(message)
        self._open[key] = shard
        while len(self._open) > self.capacity:
            self._open.popitem(last=False)
        return shard


    def _check_and_map(self, ds: Dataset, index: int,
                       job: Future | None) -> tuple[Path, memoryview | bytes]:
        """Shard `index` checked (by its prefetch `job` if that has started) and mapped."""
        if job is not None and not job.cancel():  # running or done: its result is ours
            path, stamp = job.result()
            if stamp is not None and not _unchanged(path, stamp):  # since: check again
                path, stamp = check_shard(ds, index, self._checked)
        else:
            path, stamp = check_shard(ds, index, self._checked)
        if stamp is not None:
            self._checked.add(stamp)
        try:
            return path, map_file(path)
        except FileNotFoundError:
            if not ds.remote:  # deleted since its check
                raise CorruptShard(f"{path}: shard missing") from None
        # Trimmed from the mirror since its check: fetched and checked again.
        path, stamp = check_shard(ds, index, self._checked)
        if stamp is not None:
            self._checked.add(stamp)
        return path, map_file(path)


def _cancel(pending: dict[tuple[str, int], Future]) -> None:
    for job in pending.values():
        job.cancel()
