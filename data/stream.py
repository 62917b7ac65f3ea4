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

import bisect
import logging

import numpy as np
from hymoe.data.blend import Blend, choose
from hymoe.data.errors import DataError
from hymoe.data.order import Dataset
from hymoe.data.reader import CorruptShard, ShardCache

log = logging.getLogger("hymoe.data")
_warned: set[str] = set()


_FILL_TOKENS = 32_768  # tokens packed ahead per refill (or one row, if rows are longer)


class SubStream:
    """Dataset `ds` as read by stream `stream` of `n_streams`: windows of packed documents.

    Documents are packed ahead into a buffer of as many whole rows as fit in `_FILL_TOKENS`
    tokens (one row, if rows are longer), so a row is a slice of it, not a loop over documents: short rows cost a few Python
    operations each. The buffer remembers where each document and each EOD lies in it: that gives
    a row's segment starts without scanning its tokens, and `state_dict` the exact position
    (epoch, document, offset) of the first token not yet handed out.
    """

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
        """The position of the first token not yet in a row, and the carried token."""
        carry = int(self._buf[self._c - 1]) if self._has_carry else None
        if self._c == len(self._buf):  # all packed tokens handed out: the packer's position
            at = (self.epoch, self.pos, self.offset, self.skipped_shards, self.skipped_docs)
        else:
            start, *mark = self._marks[bisect.bisect_right(self._mark_starts, self._c) - 1]
            at = (mark[0], mark[1], self._c - start, mark[2], mark[3])
        return {"epoch": at[0], "pos": at[1], "offset": at[2], "carry": carry,
                "skipped_shards": at[3], "skipped_documents": at[4]}

    def load_state_dict(self, s: dict) -> None:
        if not 0 <= s["pos"] < self.b - self.a:
            raise DataError(f"loader state: position {s['pos']} is outside stream "
                            f"{self.stream}'s {self.b - self.a} documents of '{self.ds.name}'")
        # The packer's position: the next token that goes into the buffer.
        self.epoch, self.pos, self.offset = s["epoch"], s["pos"], s["offset"]
        self.skipped_shards, self.skipped_docs = s["skipped_shards"], s["skipped_documents"]
        # The shard being read, as `_shard` returns it.
        self._cur: tuple[int, int, list[int], list[int], list[int], np.ndarray] | None = None
        self._skip_run = 0  # documents skipped since the last token produced
        carry = s["carry"]
        self._has_carry = carry is not None
        self._buf = np.array([] if carry is None else [carry], dtype=self.ds.np_dtype)
        self._c = len(self._buf)  # buffer index of the first token not yet in a row
        self._eods = [0] if carry == self.ds.eod else []  # buffer indices of EOD tokens
        # Per document (part) in the buffer: (index of its offset 0, epoch, pos, skipped shards,
        # skipped documents), in buffer order; `_mark_starts` holds the first field, for bisect.
        self._marks: list[tuple[int, int, int, int, int]] = []
        self._mark_starts: list[int] = []

    def _next_doc(self) -> None:
        self.pos += 1
        self.offset = 0
        if self.pos == self.b - self.a:
            self.epoch += 1
            self.pos = 0
            self._cur = None

    def _shard(self) -> tuple[int, int, list[int], list[int], list[int], np.ndarray]:
        """The shard that holds the document at the packer's position: (first and end position of
        this stream's documents in it, their token starts, lengths and running totals of
        length + 1 (tokens and EOD) in reading order, the shard's tokens). Opening it may skip
        corrupt shards, which moves the position."""
        g = self.a + self.pos
        cur = self._cur
        while cur is None or not cur[0] <= g < cur[1]:
            shard, lo, hi = self.ds.locate(self.seed, self.epoch, g)
            try:
                opened = self.cache.open(self.ds, shard)
            except CorruptShard as e:
                self._skip(e, hi)
                g = self.a + self.pos
                continue
            # Python ints, from one vectorised lookup per shard: a refill then finds how many
            # documents it takes with one bisect, and touches each with a few list operations.
            first, end = max(lo, self.a), min(hi, self.b)
            docs = self.ds.doc_order(self.seed, self.epoch, shard)[first - lo : end - lo]
            lengths = opened.lengths[docs]
            cur = self._cur = (first, end, opened.starts[docs].tolist(), lengths.tolist(),
                               np.cumsum(lengths + 1).tolist(), opened.tokens)
            # The shard this stream reads after this one: fetched and checked meanwhile.
            self.prefetch(*((self.epoch, hi) if hi < self.b else (self.epoch + 1, self.a)))
        return cur

    def prefetch(self, epoch: int | None = None, position: int | None = None) -> None:
        """Have the shard holding `position` of `epoch`'s order (default: the packer's position)
        fetched and checked in the background."""
        if epoch is None:
            epoch, position = self.epoch, self.a + self.pos
        self.cache.prefetch(self.ds, self.ds.locate(self.seed, epoch, position)[0])

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

    def row(self, seq_len: int) -> tuple[np.ndarray, list[int]]:
        """The next `seq_len + 1` tokens (dtype as stored; the last one is carried to the next
        row), and the positions in [1, seq_len) that follow an EOD (where a segment starts)."""
        w0 = self._c - 1 if self._has_carry else self._c
        if len(self._buf) - w0 < seq_len + 1:
            self._refill(w0, seq_len + 1)
            w0 = 0
        out = self._buf[w0 : w0 + seq_len + 1]
        lo = bisect.bisect_left(self._eods, w0)
        hi = bisect.bisect_left(self._eods, w0 + seq_len - 1, lo)
        starts = [e - w0 + 1 for e in self._eods[lo:hi]]
        self._c = w0 + seq_len + 1
        self._has_carry = True
        return out, starts

    def _refill(self, keep_from: int, row_tokens: int) -> None:
        """Drop the buffer before `keep_from` and pack documents after what is left."""
        keep = self._buf[keep_from:]
        first = max(0, bisect.bisect_right(self._mark_starts, self._c) - 1)
        marks = [(m[0] - keep_from, *m[1:]) for m in self._marks[first:]]
        eods = [e - keep_from for e in self._eods[bisect.bisect_left(self._eods, keep_from):]]
        pieces, at = [keep], len(keep)
        # Whole rows (which overlap by one token): as many as fit in _FILL_TOKENS, at least one.
        rows = max(1, (_FILL_TOKENS - 1) // (row_tokens - 1))
        need = 1 + rows * (row_tokens - 1) - at
        while need > 0:
            first, _, starts, lengths, totals, tokens = self._shard()  # may skip shards
            # Documents k.. of this shard, each its tokens then an EOD, the first from `offset`:
            # those that end by `target` go in whole, the next one up to `target`.
            k = self.a + self.pos - first
            done = (totals[k - 1] if k else 0) + self.offset  # packed of this shard's part
            target = done + need
            j = bisect.bisect_right(totals, target, k)  # documents k..j-1 go in whole
            cut = target - (totals[j - 1] if j else 0) if j < len(totals) else 0  # of doc j
            origin = at - done  # buffer index where this shard's part would start
            for i in range(k, j):
                s0 = starts[i]
                pieces.append(tokens[s0 + (self.offset if i == k else 0) : s0 + lengths[i]])
                pieces.append(self._eod)
            if cut:
                s0 = starts[j]
                pieces.append(tokens[s0 + (self.offset if j == k else 0) : s0 + cut])
            # Every document (part) put in the buffer gets a mark: where its offset 0 lies.
            marks.extend((origin + (totals[i - 1] if i else 0), self.epoch, self.pos + i - k,
                          self.skipped_shards, self.skipped_docs)
                         for i in range(k, j + (cut > 0)))
            eods.extend(origin + totals[i] - 1 for i in range(k, j))
            took = need if j < len(totals) else totals[-1] - done
            at += took
            need -= took
            self._skip_run = 0
            if j < len(totals):
                self.pos += j - k
                self.offset = cut
            else:  # the shard's part is packed: on to the next document (epoch) after it
                self.pos += j - k - 1
                self._next_doc()
        self._buf = np.concatenate(pieces)
        self._c -= keep_from
        self._marks, self._eods = marks, eods
        self._mark_starts = [m[0] for m in marks]


class Stream:
    """Stream `index`: blended rows from one `SubStream` per dataset."""

    def __init__(self, index: int, datasets: list[Dataset], blend: Blend, n_streams: int,
                 seed: int, cache: ShardCache, on_corrupt: str):
        self.index, self.datasets, self.blend, self.cache = index, datasets, blend, cache
        self._n_streams, self._seed, self._on_corrupt = n_streams, seed, on_corrupt
        self.subs: dict[int, SubStream] = {}
        self.counts = [[0] * len(datasets) for _ in blend.phases]
        self._foreign: dict[str, dict] = {}  # sub-states of datasets this blend lacks, kept

    def sub(self, d: int) -> SubStream:
        if d not in self.subs:
            self.subs[d] = SubStream(self.datasets[d], self.index, self._n_streams, self._seed,
                                     self.cache, self._on_corrupt)
        return self.subs[d]

    def next_row(self, seq_len: int, global_tokens: int) -> tuple[np.ndarray, int, list[int]]:
        """(window of seq_len + 1 tokens, dataset index, positions after an EOD) for a row whose
        micro-batch starts after `global_tokens` tokens of the whole run."""
        phase = self.blend.phase_at(global_tokens) if len(self.blend.phases) > 1 else 0
        d = 0 if len(self.datasets) == 1 else choose(self.blend.phases[phase].weights,
                                                     self.counts[phase], seq_len)
        row, starts = self.sub(d).row(seq_len)
        self.counts[phase][d] += seq_len
        return row, d, starts

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

    def batch_streams(self, j: int) -> list[int]:
        """The streams of rows `j, j + 1, …` of one micro-batch."""
        return [self.stream(i) for i in range(j, j + self.micro_batch)]

    def tokens_before(self, j: int) -> int:
        return self.base + (j // self.micro_batch) * self.micro_batch * self.seq_len * self.dp_size


def build_streams(ids: list[int], datasets: list[Dataset], blend: Blend, n_streams: int, seed: int,
                  on_corrupt: str, states: dict[int, dict] | None = None,
                  prefetch_threads: int = 0) -> dict[int, Stream]:
    """The `Stream`s `ids` of this process (sharing one shard cache), loaded from `states`;
    `prefetch_threads` fetch and check the shards they read next in the background."""
    cache = ShardCache(capacity=max(16, 2 * len(ids)), prefetch_threads=prefetch_threads)
    streams = {v: Stream(v, datasets, blend, n_streams, seed, cache, on_corrupt) for v in ids}
    for v, s in (states or {}).items():
        if v in streams:
            streams[v].load_state_dict(s)
    if prefetch_threads:  # the first rows' shards, in the order the rows are read
        used = [d for d in range(len(datasets)) if any(p.weights[d] > 0 for p in blend.phases)]
        for s in streams.values():
            for d in used:
                s.sub(d).prefetch()
    return streams
