"""`PackedStream`: endless, deterministic, resumable packed micro-batches for one DP rank.

The data of a run is read by `num_streams` independent streams (stream.py), fixed for the run;
DP rank `r` of `dp` reads streams `r, r + dp, r + 2*dp, …` round-robin, one row each, optionally in
worker processes (workers.py). Which rows a stream yields depends only on (datasets, blend, seed,
num_streams) — not on the DP size, micro-batch size or number of workers — so:

- resume is exact: the state is each stream's position plus the rank's round-robin position;
- resuming on another DP size is exact too (`load_rank_states`): the streams are dealt to the new
  ranks and each continues where it stopped; nothing is repeated or skipped, only the assignment
  of streams to ranks (and so the order of rows across ranks) changes. docs/data.md has the rules.

Each batch (B = micro_batch, S = seq_len), all CPU tensors:
    tokens      int64   [B, S]   input token ids
    labels      int64   [B, S]   next-token targets (the row's window shifted by one)
    loss_mask   float32 [B, S]   1, or 0 where the input is EOD if `eod_mask_loss`
    seq_idx     int32   [B, S]   segment index within the row: 0 at the first token, +1 on the token
                                 after each EOD and at each `context_len` cut (Mamba state resets)
    cu_seqlens  int32   [n + 1]  segment boundaries over the flattened B*S tokens (each row starts
                                 one): the THD `cu_seqlens_q/kv` of megatron's PackedSeqParams
    max_seqlen  int32   []       the longest segment
A segment is one document with its EOD, or the piece of one that a row or `context_len` cut off;
attention must not cross segment boundaries and Mamba must reset its state at each.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

import numpy as np
import torch
from hymoe.data.blend import Blend, blend_from_config
from hymoe.data.errors import DataError
from hymoe.data.manifest import shard_problems
from hymoe.data.order import Dataset, open_datasets
from hymoe.data.stream import RowSchedule, build_streams

log = logging.getLogger("hymoe.data")
_STATE_VERSION = 2
AUTO_STREAMS = 64


class PackedStream:
    """Iterator of micro-batches (dicts of CPU tensors, see the module docstring).

    `path`: a prepared directory, or a `Blend` of several. `num_streams` 0 picks
    max(64, dp_size * num_workers), at most the smallest dataset's document count; a checkpoint's
    value wins on resume. `on_corrupt`: "error" or "skip" (see docs/data.md).
    """

    def __init__(
        self,
        path: str | Path | Blend,
        seq_len: int,
        micro_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        tokenizer_fingerprint: str | None = None,
        *,
        num_streams: int = 0,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        shard_prefetch_threads: int = 2,
        on_corrupt: str = "error",
        eod_mask_loss: bool = False,
    ):
        if seq_len < 1 or micro_batch < 1:
            raise DataError(f"seq_len ({seq_len}) and micro_batch ({micro_batch}) must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        if min(seed, num_streams, num_workers, shard_prefetch_threads) < 0 or prefetch_factor < 1:
            raise DataError(f"seed ({seed}), num_streams ({num_streams}), num_workers "
                            f"({num_workers}) and shard_prefetch_threads ({shard_prefetch_threads}) "
                            f"must be >= 0, prefetch_factor ({prefetch_factor}) >= 1")
        if on_corrupt not in ("error", "skip"):
            raise DataError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        self.blend = path if isinstance(path, Blend) else Blend.single(path)
        self.datasets = open_datasets(self.blend.names, self.blend.sources, tokenizer_fingerprint)
        self.path = self.datasets[0].path
        self.manifest = self.datasets[0].manifest
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.shard_prefetch_threads = shard_prefetch_threads
        self.on_corrupt, self.eod_mask_loss = on_corrupt, eod_mask_loss
        self.eod = self.datasets[0].eod
        self._context = [d.context_len for d in self.datasets]
        if on_corrupt == "error":
            for ds in self.datasets:
                _check_sizes(ds)
        self._fixed_streams = num_streams
        smallest = min(self.datasets, key=lambda d: d.n_docs)
        if smallest.n_docs < dp_size:
            raise DataError(f"dataset '{smallest.name}' ({smallest.where}) has {smallest.n_docs} "
                            f"documents, fewer than dp_size={dp_size}; every rank needs one")
        n = num_streams or min(max(AUTO_STREAMS, dp_size * max(1, num_workers)), smallest.n_docs)
        self._pool = None
        self.wait_s = 0.0  # seconds spent in __next__: reading, packing, waiting for workers
        self._layout(n, rr=0, base_tokens=0, states={})

    # -- layout --------------------------------------------------------------------------------
    def _layout(self, n: int, rr: int, base_tokens: int, states: dict[int, dict]) -> None:
        small = [d for d in self.datasets if d.n_docs < n]
        if small:
            raise DataError(f"dataset '{small[0].name}' ({small[0].where}) has {small[0].n_docs} "
                            f"documents, fewer than num_streams={n}; lower data.num_streams")
        if n < self.dp_size:
            raise DataError(f"num_streams={n} is smaller than dp_size={self.dp_size}: every rank "
                            "reads at least one stream; raise data.num_streams (fixed for a run)")
        self.close()
        self.num_streams = n
        self.rank_streams = list(range(self.dp_rank, n, self.dp_size))
        self.workers = min(self.num_workers, len(self.rank_streams))
        self._sched = RowSchedule(self.rank_streams, rr, base_tokens, self.seq_len,
                                  self.micro_batch, self.dp_size)
        self._j = 0
        self._states = {v: states[v] for v in self.rank_streams if v in states}
        self._live = None if self.workers else build_streams(
            self.rank_streams, self.datasets, self.blend, n, self.seed, self.on_corrupt,
            self._states, self.shard_prefetch_threads)

    @property
    def tokens_per_batch(self) -> int:
        """Input tokens per micro-batch: micro_batch * seq_len."""
        return self.micro_batch * self.seq_len

    @property
    def tokens(self) -> int:
        """Global tokens consumed (all DP ranks, which consume in lockstep)."""
        return self._sched.tokens_before(self._j)

    @property
    def epoch(self) -> int:
        """The lowest epoch any dataset is in on any of this rank's streams (0-based)."""
        subs = [s for st in self._stream_states().values() for s in st["subs"].values()]
        return min((s["epoch"] for s in subs), default=0)

    def epoch_documents(self, dataset: str, stream: int, epoch: int) -> np.ndarray:
        """What `stream` reads of `dataset` in `epoch`: int64 [docs, 2] of (shard, index in shard)."""
        ds = self.datasets[self.blend.names.index(dataset)]
        return ds.epoch_documents(self.seed, epoch, stream, self.num_streams)

    # -- batches -------------------------------------------------------------------------------
    def __iter__(self) -> PackedStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        try:
            return self._next()
        finally:
            self.wait_s += time.perf_counter() - t0

    def _next(self) -> dict[str, torch.Tensor]:
        if self._live is not None:
            before = self._sched.tokens_before(self._j)  # the same for the micro-batch's rows
            rows = [self._live[v].next_row(self.seq_len, before)
                    for v in self._sched.batch_streams(self._j)]
        else:
            if self._pool is None:
                self._start_workers()
            rows, states = self._pool.get_batch(self._j // self.micro_batch)
            self._states.update(states)
        self._j += self.micro_batch
        return self._assemble(rows)

    def _start_workers(self) -> None:
        from hymoe.data.workers import WorkerPool

        s = self._sched
        spec = {"blend": self.blend, "datasets": self.datasets, "n_streams": self.num_streams,
                "seed": self.seed, "on_corrupt": self.on_corrupt,
                "prefetch_threads": self.shard_prefetch_threads,
                "schedule": (s.streams, s.position(self._j), s.tokens_before(self._j), s.seq_len,
                             s.micro_batch, s.dp_size)}
        self._pool = WorkerPool(spec, self.workers, dict(self._states), self.prefetch_factor)
        # The workers count rows from here; so does the consumer.
        self._sched = RowSchedule(*spec["schedule"])
        self._j = 0

    def _assemble(self, rows: list[tuple[np.ndarray, int, list[int]]]) -> dict[str, torch.Tensor]:
        B, S = self.micro_batch, self.seq_len
        tokens = np.empty((B, S), dtype=np.int64)
        labels = np.empty((B, S), dtype=np.int64)
        seq_idx = np.zeros((B, S), dtype=np.int32)  # rows of one segment need nothing more
        cu: list[int] = []
        longest = 0
        for i, (row, d, starts) in enumerate(rows):
            tokens[i] = row[:-1]  # widened from the stored dtype in the copy
            labels[i] = row[1:]
            # Segment starts: the row's first token, each token after an EOD (the packer knows
            # where it put them), every context_len-th token of a dataset with contexts.
            c = self._context[d]
            if c is not None and c < S:
                starts = sorted(set(starts).union(range(c, S, c)))
            cu.append(i * S)
            if not starts:
                longest = S  # as long as a segment can be
                continue
            bounds = [0, *starts, S]
            lengths = [b - a for a, b in itertools.pairwise(bounds)]
            longest = max(longest, max(lengths))
            idx = seq_idx[i]
            if len(starts) < 8:  # a few slice fills beat building the index array
                for k in range(1, len(bounds) - 1):
                    idx[bounds[k] : bounds[k + 1]] = k
            else:
                idx[:] = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
            base = i * S
            cu.extend([base + b for b in starts])
        cu.append(B * S)
        loss_mask = torch.ones(B, S, dtype=torch.float32)
        if self.eod_mask_loss:
            loss_mask[torch.from_numpy(tokens == self.eod)] = 0.0
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": loss_mask,
            "seq_idx": torch.from_numpy(seq_idx),
            "cu_seqlens": torch.from_numpy(np.array(cu, dtype=np.int32)),
            "max_seqlen": torch.from_numpy(np.array(longest, dtype=np.int32)),
        }

    # -- state ---------------------------------------------------------------------------------
    def _stream_states(self) -> dict[int, dict]:
        if self._live is not None:
            return {v: s.state_dict() for v, s in self._live.items()}
        return {v: self._states.get(v, {"subs": {}, "tokens": []}) for v in self.rank_streams}

    def state_dict(self) -> dict:
        """Plain ints, strings and lists (JSON-safe): what this rank has *received*, exactly."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "num_streams": self.num_streams,
            "datasets": {d.name: d.id for d in self.datasets},
            "tokens": self.tokens,
            "rr": self._sched.position(self._j),
            "streams": {str(v): s for v, s in self._stream_states().items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from this rank's `state` (same DP size and rank). For another DP size, pass
        every old rank's state to `load_rank_states`."""
        self._check(state)
        if (state["dp_size"], state["dp_rank"]) != (self.dp_size, self.dp_rank):
            raise DataError(
                f"loader state is rank {state['dp_rank']} of dp_size={state['dp_size']}, this "
                f"stream is rank {self.dp_rank} of {self.dp_size}; to resume on another DP size "
                "pass every rank's state to PackedStream.load_rank_states")
        self._layout(state["num_streams"], state["rr"], state["tokens"],
                     {int(v): s for v, s in state["streams"].items()})

    def load_rank_states(self, states: Mapping[str, dict] | Sequence[dict]) -> str | None:
        """Continue from the states of *all* DP ranks of a checkpoint, on this DP size.

        Same DP size: exactly `load_state_dict` of this rank's state. Another DP size: the streams
        are dealt to the new ranks (rank r reads streams r, r + dp, …) and each continues from its
        own position: no row is repeated or skipped. Returns a line saying so, also logged.
        """
        states = list(states.values()) if isinstance(states, Mapping) else list(states)
        if not states:
            raise DataError("load_rank_states: no states given")
        for s in states:
            self._check(s)
        old = states[0]["dp_size"]
        if sorted(s["dp_rank"] for s in states) != list(range(old)) or any(
                s["dp_size"] != old for s in states):
            raise DataError(f"load_rank_states needs one state per rank of dp_size={old}, got "
                            f"ranks {sorted(s['dp_rank'] for s in states)}")
        tokens = {s["tokens"] for s in states}
        if len(tokens) != 1:
            raise DataError(f"loader states of different ranks consumed different token counts "
                            f"{sorted(tokens)}; they must come from one checkpoint")
        if old == self.dp_size:
            self.load_state_dict(next(s for s in states if s["dp_rank"] == self.dp_rank))
            return None
        merged = {int(v): st for s in states for v, st in s["streams"].items()}
        self._layout(states[0]["num_streams"], 0, tokens.pop(), merged)
        msg = (f"data: resuming a dp_size={old} loader state on dp_size={self.dp_size}: the "
               f"{self.num_streams} streams are dealt anew (this rank reads "
               f"{len(self.rank_streams)}) and each continues where it stopped, so no document "
               "is repeated or skipped; rows are ordered across ranks differently from a run "
               f"that always had dp_size={self.dp_size}")
        log.warning(msg)
        return msg

    def _check(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r} is not "
                            f"{_STATE_VERSION} (written by another hymoe); its reading order "
                            "differs, so it cannot be continued exactly: start the data afresh")
        if state["seed"] != self.seed:
            raise DataError(f"loader state field 'seed' is {state['seed']!r} but this stream has "
                            f"{self.seed!r}; resume with the same seed")
        if self._fixed_streams and state["num_streams"] != self._fixed_streams:
            raise DataError(f"loader state has num_streams={state['num_streams']}, the config "
                            f"{self._fixed_streams}; the stream count is fixed for a run: set "
                            f"data.num_streams={state['num_streams']} (or 0)")
        mine = {d.name: d.id for d in self.datasets}
        for name, ident in state["datasets"].items():
            if name in mine and mine[name] != ident:
                raise DataError(f"loader state field 'dataset' {name!r}: the checkpoint read other "
                                f"shards than {self.datasets[self.blend.names.index(name)].where} "
                                "holds; point the dataset at the data the run started with")

    # -- metrics -------------------------------------------------------------------------------
    def blend_tokens(self) -> list[dict[str, int]]:
        """Tokens received per phase and dataset on this rank: [{name: tokens}] (sum over ranks
        for the run's totals)."""
        out = [{n: 0 for n, w in zip(self.blend.names, p.weights) if w > 0}
               for p in self.blend.phases]
        for st in self._stream_states().values():
            for phase, counts in enumerate(st["tokens"][: len(out)]):
                for name, c in counts.items():
                    out[phase][name] = out[phase].get(name, 0) + c
        return out

    def metrics(self) -> dict[str, float]:
        """Flat numbers for the metrics file (this rank): the phase, each dataset's realised share
        of the current phase's tokens, and what `on_corrupt=skip` skipped."""
        phase = self.blend.phase_at(self.tokens)
        counts = self.blend_tokens()[phase]
        total = sum(counts.values())
        subs = [s for st in self._stream_states().values() for s in st["subs"].values()]
        out: dict[str, float] = {"data/phase": phase, "data/epoch": self.epoch}
        out.update({f"data/share/{n}": (c / total if total else 0.0) for n, c in counts.items()})
        out["data/skipped_shards"] = sum(s["skipped_shards"] for s in subs)
        out["data/skipped_documents"] = sum(s["skipped_documents"] for s in subs)
        return out

    # -- workers -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop worker processes and queued shard checks (both also stop when the stream is
        garbage-collected)."""
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is not None:
            pool.close()
        if getattr(self, "_live", None):  # the streams share one cache
            next(iter(self._live.values())).cache.cancel_prefetch()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_sizes(ds: Dataset) -> None:
    """Fail now, not hours into training, on a missing or truncated shard (sha256 is checked
    when a shard is first opened; a remote dataset's shards are all checked when fetched)."""
    if ds.remote:
        return
    for i, s in enumerate(ds.shards):
        p = ds.path / s["name"]
        if not p.is_file():
            raise DataError(f"{p}: shard missing (dataset '{ds.name}'); restore it or re-run "
                            "`hymoe data prepare`, or set data.on_corrupt=skip")
        if p.stat().st_size != s["bytes"]:
            problems = "; ".join(shard_problems(p.read_bytes(), ds.manifest, i))
            raise DataError(f"{p}: corrupt shard: {problems} — dataset '{ds.name}'; run `hymoe "
                            f"data verify {ds.path}`, or set data.on_corrupt=skip to skip it")


def build_stream(cfg, seq_len: int, micro_batch: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, total_tokens: int | None = None,
                 tokenizer_fingerprint: str | None = None) -> PackedStream:
    """The stream a `DataConfig` describes (what the trainer calls)."""
    cfg.validate()
    return PackedStream(
        blend_from_config(cfg, total_tokens), seq_len, micro_batch, dp_rank, dp_size, seed,
        tokenizer_fingerprint, num_streams=cfg.num_streams, num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch_factor, shard_prefetch_threads=cfg.shard_prefetch_threads,
        on_corrupt=cfg.on_corrupt,
        eod_mask_loss=cfg.eod_mask_loss)
