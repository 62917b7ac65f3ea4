"""Rows: the token windows that become micro-batch rows, produced stream by stream (numpy only).

A `SubStream` packs one dataset's documents, in the order of its span (order.py), into a token
stream with an EOD after each document, and cuts it into windows of `seq_len + 1` tokens that
overlap by one (a row's last label is the next row's first input, as in Megatron's GPTDataset, so
no token pair is lost). Its position is (epoch, position in span, token offset in the document,
carried token): a few ints, whatever the document or row length.

A `Stream` owns one `SubStream` per dataset and picks the dataset of each row with the blend's
deficit rule (blend.py), counting tokens per phase and dataset; those counts are both the blend's
memory and the realised proportions that get logged.

This module imports no torch: worker processes (workers.py) run it and start in a fraction of a
second.
"""

from __future__ import annotations

import logging

import numpy as np
from hymoe.data.blend import Blend, choose
from hymoe.data.errors import DataError
from hymoe.data.order import Dataset
from hymoe.data.reader import CorruptShard, OpenShard, ShardCache

log = logging.getLogger("hymoe.data")
_warned: set[str] = set()


class SubStream:
    """Dataset `ds` as read by stream `stream` of `n_streams`: windows of packed documents."""

    def __init__(self, ds: Dataset, stream: int, n_streams: int, seed: int, cache: ShardCache,
                 on_corrupt: str):
        self.ds, self.stream, self.seed, self.cache, self.on_corrupt = ds, stream, seed, cache, on_corrupt
        self.a, self.b = ds.span(stream, n_streams)
        if self.b <= self.a:
            raise DataError(f"dataset '{ds.name}' ({ds.where}) has {ds.n_docs} documents, fewer "
                            f"than data.num_streams={n_streams}; lower data.num_streams")
        self._eod = np.array([ds.eod], dtype=ds.np_dtype)
        self.load_state_dict({"epoch": 0, "pos": 0, "offset": 0, "carry": None,
                              "skipped_shards": 0, "skipped_documents": 0})

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "offset": self.offset, "carry": self.carry,
                "skipped_shards": self.skipped_shards, "skipped_documents": self.skipped_docs}

    def load_state_dict(self, s: dict) -> None:
        if not 0 <= s["pos"] < self.b - self.a:
            raise DataError(f"loader state: position {s['pos']} is outside stream "
                            f"{self.stream}'s {self.b - self.a} documents of '{self.ds.name}'")
        self.epoch, self.pos, self.offset, self.carry = s["epoch"], s["pos"], s["offset"], s["carry"]
        self.skipped_shards, self.skipped_docs = s["skipped_shards"], s["skipped_documents"]
        self._cur: tuple[int, int, np.ndarray, OpenShard] | None = None  # lo, hi, doc order, shard
        self._skip_run = 0  # documents skipped since the last token produced

    def _next_doc(self) -> None:
        self.pos += 1
        self.offset = 0
        if self.pos == self.b - self.a:
            self.epoch += 1
            self.pos = 0
            self._cur = None

    def _doc(self) -> np.ndarray:
        g = self.a + self.pos
        while self._cur is None or not self._cur[0] <= g < self._cur[1]:
            shard, lo, hi = self.ds.locate(self.seed, self.epoch, g)
            try:
                opened = self.cache.open(self.ds, shard)
            except CorruptShard as e:
                self._skip(e, hi)
                g = self.a + self.pos
                continue
            self._cur = (lo, hi, self.ds.doc_order(self.seed, self.epoch, shard), opened)
        lo, _, order, opened = self._cur
        return opened.doc(int(order[g - lo]))

    def _skip(self, e: CorruptShard, shard_end: int) -> None:
        """Skip the rest of a corrupt shard's documents in this span (or raise, by policy)."""
        if self.on_corrupt != "skip":
            raise DataError(f"{e} — dataset '{self.ds.name}'; run `hymoe data verify "
                            f"{self.ds.where}` and prepare the shard again, or set "
                            "data.on_corrupt=skip to skip it") from None
        if str(e) not in _warned:
            _warned.add(str(e))
            log.warning("data: skipping (data.on_corrupt=skip) %s", e)
        end = min(shard_end, self.b)
        n = end - (self.a + self.pos)
        self.skipped_shards += 1
        self.skipped_docs += n
        self._skip_run += n
        if self._skip_run > self.b - self.a:
            raise DataError(f"every shard that stream {self.stream} reads of dataset "
                            f"'{self.ds.name}' ({self.ds.where}) is corrupt; run `hymoe data "
                            f"verify {self.ds.where}`")
        self.pos = end - self.a - 1
        self._next_doc()

    def row(self, seq_len: int) -> np.ndarray:
        """The next `seq_len + 1` tokens (dtype as stored); the last one is carried to the next row."""
        pieces: list[np.ndarray] = []
        need = seq_len + 1
        if self.carry is not None:
            pieces.append(np.array([self.carry], dtype=self.ds.np_dtype))
            need -= 1
        while need > 0:
            doc = self._doc()
            n = len(doc)
            if self.offset < n:
                take = min(need, n - self.offset)
                pieces.append(doc[self.offset : self.offset + take])
                self.offset += take
                need -= take
            if need > 0 and self.offset == n:
                pieces.append(self._eod)
                self.offset += 1
                need -= 1
            self._skip_run = 0
            if self.offset == n + 1:
                self._next_doc()
        out = np.concatenate(pieces)
        self.carry = int(out[-1])
        return out


class Stream:
    """Stream `index`: blended rows from one `SubStream` per dataset."""

    def __init__(self, index: int, datasets: list[Dataset], blend: Blend, n_streams: int,
                 seed: int, cache: ShardCache, on_corrupt: str):
        self.index, self.datasets, self.blend = index, datasets, blend
        self._args = (n_streams, seed, cache, on_corrupt)
        self.subs: dict[int, SubStream] = {}
        self.counts = [[0] * len(datasets) for _ in blend.phases]
        self._foreign: dict[str, dict] = {}  # sub-states of datasets this blend lacks, kept

    def sub(self, d: int) -> SubStream:
        if d not in self.subs:
            self.subs[d] = SubStream(self.datasets[d], self.index, *self._args)
        return self.subs[d]

    def next_row(self, seq_len: int, global_tokens: int) -> tuple[np.ndarray, int]:
        """(window of seq_len + 1 tokens, dataset index) for a row whose micro-batch starts after
        `global_tokens` tokens of the whole run."""
        phase = self.blend.phase_at(global_tokens)
        d = choose(self.blend.phases[phase].weights, self.counts[phase], seq_len)
        row = self.sub(d).row(seq_len)
        self.counts[phase][d] += seq_len
        return row, d

    def state_dict(self) -> dict:
        names = [d.name for d in self.datasets]
        subs = dict(self._foreign)
        subs.update({names[d]: s.state_dict() for d, s in self.subs.items()})
        return {"subs": subs,
                "tokens": [{n: c for n, c in zip(names, cs) if c} for cs in self.counts]}

    def load_state_dict(self, state: dict) -> None:
        index = {d.name: i for i, d in enumerate(self.datasets)}
        self.subs, self._foreign = {}, {}
        for name, s in state["subs"].items():
            if name in index:
                self.sub(index[name]).load_state_dict(s)
            else:
                self._foreign[name] = s
        self.counts = [[0] * len(self.datasets) for _ in self.blend.phases]
        for phase, cs in enumerate(state["tokens"][: len(self.counts)]):
            for name, c in cs.items():
                if name in index:
                    self.counts[phase][index[name]] = c


class RowSchedule:
    """Which stream fills a rank's row `j` (counted from the last load), and the global tokens
    consumed before that row's micro-batch (which decides the blend phase).

    A rank reads its streams round-robin, starting at position `rr`; all ranks consume micro-batches
    in lockstep, so before micro-batch `i` the run has consumed `base + i * B * S * dp` tokens.
    """

    def __init__(self, streams: list[int], rr: int, base_tokens: int, seq_len: int,
                 micro_batch: int, dp_size: int):
        self.streams, self.rr, self.base = streams, rr, base_tokens
        self.seq_len, self.micro_batch, self.dp_size = seq_len, micro_batch, dp_size

    def position(self, j: int) -> int:
        return (self.rr + j) % len(self.streams)

    def stream(self, j: int) -> int:
        return self.streams[self.position(j)]

    def tokens_before(self, j: int) -> int:
        return self.base + (j // self.micro_batch) * self.micro_batch * self.seq_len * self.dp_size


def build_streams(ids: list[int], datasets: list[Dataset], blend: Blend, n_streams: int, seed: int,
                  on_corrupt: str, states: dict[int, dict] | None = None) -> dict[int, Stream]:
    """The `Stream`s `ids` of this process (sharing one shard cache), loaded from `states`."""
    cache = ShardCache(capacity=max(16, 2 * len(ids)))
    streams = {v: Stream(v, datasets, blend, n_streams, seed, cache, on_corrupt) for v in ids}
    for v, s in (states or {}).items():
        if v in streams:
            streams[v].load_state_dict(s)
    return streams
