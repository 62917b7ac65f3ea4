"""The reading order: which documents each stream reads in each epoch, computed, never stored.

Epoch `e` of a dataset is one permutation of all its documents: the shards in a random order, and
within each shard its documents in a random order (generators seeded from (seed, dataset name, e)
and (…, shard)). Stream `v` of `n` reads the contiguous span `[v*N//n, (v+1)*N//n)` of it, so the
streams together read every document exactly once per epoch, and each stream opens only the one
or two shards its span touches at a time (I/O is read once in all, not once per rank).

Nothing here depends on the DP layout or the number of worker processes: they only decide which
process runs which stream (loader.py). Memory is O(shards) per cached epoch, never O(documents).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
from hymoe.data.blend import Source
from hymoe.data.errors import DataError
from hymoe.data.manifest import first_keys, load_manifest
from hymoe.data.remote import cache_limit, is_remote, mirror_dir
from hymoe.data.shards import DTYPES


class Dataset:
    """A prepared directory as the loader reads it (manifest facts, order; no shard is opened)."""

    def __init__(self, name: str, source: Source):
        self.name, self.context_len = name, source.context_len
        # A remote dataset is read from its local mirror; shards arrive as streams need them.
        self.remote = str(source.path) if is_remote(source.path) else None
        self.path = mirror_dir(self.remote) if self.remote else Path(source.path)
        if self.remote:
            cache_limit()  # a bad $HYMOE_DATA_CACHE_GB fails now, not at the first fetch
        self.manifest = m = load_manifest(self.remote or self.path)
        tok = m["tokenizer"]
        self.fingerprint, self.eod, self.vocab_size = tok["fingerprint"], tok["eod_id"], tok["vocab_size"]
        self.dtype = m["dtype"]
        self.np_dtype = DTYPES[self.dtype]
        self.shards = m["shards"]
        self.docs_per_shard = np.array([s["documents"] for s in self.shards], dtype=np.int64)
        self.first_keys = first_keys(m)
        self.n_docs = int(self.docs_per_shard.sum())
        # Identity for state dicts: the shards' hashes, in order.
        self.id = hashlib.sha256("".join(s["sha256"] for s in self.shards).encode()).hexdigest()
        self._key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        self._orders: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._doc_orders: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()

    @property
    def where(self) -> str:
        """The location to name in messages: the remote one, or the directory."""
        return self.remote or str(self.path)

    def _rng(self, seed: int, epoch: int, shard: int = -1) -> np.random.Generator:
        return np.random.default_rng([seed, self._key, epoch, shard + 1])

    def shard_order(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shards in reading order, cumulative document counts along that order): int64 [shards]."""
        key = (seed, epoch)
        if key not in self._orders:
            perm = self._rng(seed, epoch).permutation(len(self.shards))
            self._orders[key] = (perm, np.cumsum(self.docs_per_shard[perm]))
            # The streams of a process sit in a few neighbouring epochs of a large dataset, but in
            # many of a small one (short epochs), whose orders are small.
            while len(self._orders) > (64 if len(self.shards) <= 10_000 else 4):
                self._orders.popitem(last=False)
        else:
            self._orders.move_to_end(key)
        return self._orders[key]

    def doc_order(self, seed: int, epoch: int, shard: int) -> np.ndarray:
        """The documents of `shard` (indices within it) in epoch `epoch`'s reading order."""
        key = (seed, epoch, shard)
        if key not in self._doc_orders:
            self._doc_orders[key] = self._rng(seed, epoch, shard).permutation(
                int(self.docs_per_shard[shard]))
            # Neighbouring streams share a shard; a few dozen orders are kilobytes.
            while len(self._doc_orders) > 256:
                self._doc_orders.popitem(last=False)
        return self._doc_orders[key]

    def span(self, stream: int, n_streams: int) -> tuple[int, int]:
        """Positions `[a, b)` of every epoch's order that stream `stream` of `n_streams` reads."""
        return stream * self.n_docs // n_streams, (stream + 1) * self.n_docs // n_streams

    def locate(self, seed: int, epoch: int, position: int) -> tuple[int, int, int]:
        """Position in epoch order → (shard, first position of that shard, its end position)."""
        perm, cum = self.shard_order(seed, epoch)
        p = int(np.searchsorted(cum, position, side="right"))
        start = int(cum[p - 1]) if p else 0
        return int(perm[p]), start, int(cum[p])

    def epoch_documents(self, seed: int, epoch: int, stream: int, n_streams: int) -> np.ndarray:
        """What `stream` reads in `epoch`: int64 [docs, 2] of (shard, index in shard), in order.

        For tests and inspection; the loader walks the same order lazily.
        """
        a, b = self.span(stream, n_streams)
        out, pos = [], a
        while pos < b:
            shard, lo, hi = self.locate(seed, epoch, pos)
            end = min(hi, b)
            docs = self.doc_order(seed, epoch, shard)[pos - lo : end - lo]
            out.append(np.stack([np.full(len(docs), shard), docs], axis=1))
            pos = end
        return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def open_datasets(names: list[str], sources: list[Source],
                  tokenizer_fingerprint: str | None = None) -> list[Dataset]:
    """Load every dataset's manifest and check that they share one tokenizer (and the model's)."""
    datasets = [Dataset(n, s) for n, s in zip(names, sources)]
    first = datasets[0]
    for d in datasets[1:]:
        if d.fingerprint != first.fingerprint or d.eod != first.eod or d.dtype != first.dtype:
            raise DataError(
                f"datasets '{first.name}' ({first.path}) and '{d.name}' ({d.path}) were prepared "
                f"with different tokenizers ({first.fingerprint[:16]}… vs {d.fingerprint[:16]}…); "
                "prepare every dataset of a blend with the same tokenizer.json")
    if tokenizer_fingerprint is not None and tokenizer_fingerprint != first.fingerprint:
        raise DataError(
            f"{first.path}: prepared with tokenizer {first.fingerprint[:16]}…, but the model "
            f"expects {tokenizer_fingerprint[:16]}…; prepare the data again with the model's "
            "tokenizer")
    return datasets
