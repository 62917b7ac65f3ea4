"""Opening shards for reading: memory-mapped, checked against the manifest once per process.

A shard is mapped, not read into the heap: documents are numpy views into the page cache, so a
stream holds no token it has not yet copied into a row, whatever the shard or document size, and
the streams of one process that share a shard share its pages. The sha256 of the whole file is
checked the first time a process opens it; any mismatch is diagnosed by
`manifest.shard_problems`, which names the sample.
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hymoe.data.errors import DataError
from hymoe.data.manifest import shard_problems
from hymoe.data.order import Dataset
from hymoe.data.remote import fetch, join
from hymoe.data.shards import member_spans, sha256_file


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


def _map(path: Path) -> memoryview | bytes:
    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # empty file, or a file system without mmap
            return f.read()
    return memoryview(mm)


class ShardCache:
    """The shards open in this process (LRU), plus what is known to be corrupt.

    Substreams keep a reference to the shard they read, so eviction never closes a shard in use;
    `capacity` only bounds shards that no stream reads any more.
    """

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._open: OrderedDict[tuple[str, int], OpenShard] = OrderedDict()
        self._checked: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) hashed OK
        self._corrupt: dict[tuple[str, int], str] = {}

    def open(self, ds: Dataset, index: int) -> OpenShard:
        """The shard `index` of `ds`, checked; raises `CorruptShard` naming shard and sample."""
        key = (str(ds.path), index)
        if key in self._corrupt:
            raise CorruptShard(self._corrupt[key])
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        entry = ds.shards[index]
        path = ds.path / entry["name"]
        if ds.remote and not path.is_file():
            path = fetch(ds.remote, entry["name"])
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return self._fail(key, f"{path}: shard missing")
        stamp = (str(path), st.st_size, st.st_mtime_ns)
        if stamp not in self._checked:
            # Hashed by plain sequential reads (a bounded buffer), not through the mapping; the
            # pages it reads stay in the page cache for the mapping.
            if st.st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                problems = shard_problems(_map(path), ds.manifest, index)
                if ds.remote:  # fetched again on the next open: the copy may be what broke
                    where = join(ds.remote, entry["name"])
                    path.unlink(missing_ok=True)
                    return self._fail(key, f"{where}: corrupt shard: {'; '.join(problems)}")
                return self._fail(key, f"{path}: corrupt shard: {'; '.join(problems)}")
            self._checked.add(stamp)
        data = _map(path)
        starts, sizes = member_spans(data)
        item = ds.np_dtype.itemsize
        tokens = np.frombuffer(data, dtype=ds.np_dtype, count=len(data) // item)
        shard = OpenShard(tokens, starts // item, sizes // item)
        if len(starts) != entry["documents"]:  # sha256 matched, so the manifest itself is off
            return self._fail(key, f"{path}: holds {len(starts)} samples, manifest says "
                                   f"{entry['documents']}; re-run `hymoe data prepare`")
        self._open[key] = shard
        while len(self._open) > self.capacity:
            self._open.popitem(last=False)
        return shard

    def _fail(self, key: tuple[str, int], message: str):
        self._corrupt[key] = message
        raise CorruptShard(message)
