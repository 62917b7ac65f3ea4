"""`PackedStream`: endless, deterministic, resumable packed micro-batches for one DP rank.

Order. Epoch `e` shuffles the shards and, within each shard, its documents, with a generator
seeded from (seed, e); the same permutation is computed on every rank, and position `i` of it goes
to rank `i % dp_size`, so ranks see disjoint documents whose union is the dataset. Shuffling within
shards (not across the whole dataset) keeps one shard open at a time. Every rank reads every shard
and keeps 1/dp_size of it; fine while shards are few MB — split by shard once datasets are large.

Packing. Each document is followed by the EOD token and the documents are concatenated into one
token stream per rank. A micro-batch takes the next `micro_batch * seq_len + 1` tokens of the stream;
row b's inputs are stream[b*S : b*S+S] and its labels the same shifted by one, so no token pair is
lost between rows or batches (the next batch starts with this batch's last label, as in Megatron's
GPTDataset). Labels cross document boundaries (the label at an EOD input is the next document's
first token); `loss_mask` is all ones for now, and `seq_idx` tells a document-aware kernel where the
boundaries are.

Resume. The position is a token cursor (epoch, document in this rank's epoch order, token offset
within it, and the one carried-over token), so `state_dict()` is a few ints and a restored stream
yields exactly the batches that would have come next — even with another seq_len or micro_batch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from hymoe.data.errors import DataError
from hymoe.data.manifest import first_keys, load_manifest, read_shard
from hymoe.data.shards import DTYPES, decode_documents

_STATE_VERSION = 1


class PackedStream:
    """Iterator of micro-batches (dicts of CPU tensors) from a directory made by `prepare`.

    Each batch, with B = micro_batch and S = seq_len:
        tokens    int64   [B, S]  input token ids
        labels    int64   [B, S]  next-token targets: tokens shifted left by one
        loss_mask float32 [B, S]  all ones (cross-document labels are kept, see module docstring)
        seq_idx   int32   [B, S]  document index within the row: 0 at the row's first token,
                                  +1 on the token after each EOD
    """

    def __init__(
        self,
        path: str | Path,
        seq_len: int,
        micro_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        tokenizer_fingerprint: str | None = None,
    ):
        if seq_len < 1 or micro_batch < 1:
            raise DataError(f"seq_len ({seq_len}) and micro_batch ({micro_batch}) must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        self.path = Path(path)
        self.manifest = m = load_manifest(self.path)
        fp = m["tokenizer"]["fingerprint"]
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != fp:
            raise DataError(
                f"{self.path}: prepared with tokenizer {fp[:16]}…, but the model expects "
                f"{tokenizer_fingerprint[:16]}…; prepare the data again with the model's tokenizer"
            )
        if m["totals"]["documents"] < dp_size:
            raise DataError(f"{self.path} has {m['totals']['documents']} documents, fewer than "
                            f"dp_size={dp_size}; every rank needs at least one")
        # Cheap up-front check so a missing or truncated shard fails now, not hours into training;
        # the sha256 is checked when each shard is opened.
        for s in m["shards"]:
            p = self.path / s["name"]
            if not p.is_file() or p.stat().st_size != s["bytes"]:
                raise DataError(f"{p}: shard missing or of the wrong size (manifest says "
                                f"{s['bytes']} bytes); run `hymoe data verify {self.path}`")
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.eod = m["tokenizer"]["eod_id"]
        self._dtype = m["dtype"]
        self._eod_piece = np.array([self.eod], dtype=DTYPES[self._dtype])
        self._docs_per_shard = [s["documents"] for s in m["shards"]]
        self._first_keys = first_keys(m)
        # The dataset's identity for state dicts: its shards' hashes, in order.
        self._dataset_id = hashlib.sha256(
            "".join(s["sha256"] for s in m["shards"]).encode()).hexdigest()
        self._open: tuple[int, list[np.ndarray]] | None = None
        self._set_position(epoch=0, cursor=0, offset=0, carry=None)

    @property
    def tokens_per_batch(self) -> int:
        """Input tokens per micro-batch: micro_batch * seq_len."""
        return self.micro_batch * self.seq_len

    @property
    def epoch(self) -> int:
        """Epoch of the next token to be read (0-based; each rank counts its own)."""
        return self._epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's documents for `epoch`, in reading order: int64 [n, 2] of (shard, index in shard)."""
        rng = np.random.default_rng([self.seed, epoch])
        parts = []
        for s in rng.permutation(len(self._docs_per_shard)):
            n = self._docs_per_shard[s]
            parts.append(np.stack([np.full(n, s), rng.permutation(n)], axis=1))
        return np.concatenate(parts)[self.dp_rank :: self.dp_size]

    def __iter__(self) -> PackedStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        B, S = self.micro_batch, self.seq_len
        pieces: list[np.ndarray] = []
        need = B * S + 1
        if self._carry is not None:
            pieces.append(np.array([self._carry], dtype=DTYPES[self._dtype]))
            need -= 1
        while need > 0:
            doc = self._current_doc()
            n = len(doc)
            if self._offset < n:
                take = min(need, n - self._offset)
                pieces.append(doc[self._offset : self._offset + take])
                self._offset += take
                need -= take
            if need > 0 and self._offset == n:
                pieces.append(self._eod_piece)
                self._offset += 1
                need -= 1
            if self._offset == n + 1:
                self._advance_doc()
        flat = torch.from_numpy(np.concatenate(pieces).astype(np.int64))
        self._carry = int(flat[-1])
        tokens = flat[:-1].view(B, S)
        is_eod = (tokens == self.eod).to(torch.int32)
        return {
            "tokens": tokens,
            "labels": flat[1:].view(B, S),
            "loss_mask": torch.ones(B, S, dtype=torch.float32),
            # Exclusive cumsum: the EOD itself still belongs to the document it ends.
            "seq_idx": (is_eod.cumsum(dim=1, dtype=torch.int32) - is_eod),
        }

    def state_dict(self) -> dict:
        """Plain ints and strings: the exact stream position plus what it is only valid for."""
        return {
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "cursor": self._cursor,
            "offset": self._offset,
            "carry": self._carry,
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "dataset": self._dataset_id,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. Seed, DP layout and dataset must match: a different one would
        silently repeat or skip documents, so it is an error here, not a guess."""
        for key in ("version", "seed", "dp_rank", "dp_size", "dataset"):
            mine = _STATE_VERSION if key == "version" else self.state_dict()[key]
            if state.get(key) != mine:
                raise DataError(
                    f"loader state field '{key}' is {state.get(key)!r} but this stream has "
                    f"{mine!r}; resume with the same {key} or start the data stream afresh")
        self._set_position(state["epoch"], state["cursor"], state["offset"], state["carry"])

    # -- position ---------------------------------------------------------------------------
    def _set_position(self, epoch: int, cursor: int, offset: int, carry: int | None) -> None:
        self._epoch, self._order = epoch, self.epoch_order(epoch)
        if not 0 <= cursor < len(self._order):
            raise DataError(f"loader state cursor {cursor} is outside epoch {epoch}'s "
                            f"{len(self._order)} documents for this rank")
        self._cursor, self._offset, self._carry = cursor, offset, carry

    def _advance_doc(self) -> None:
        self._cursor += 1
        self._offset = 0
        if self._cursor == len(self._order):
            self._epoch += 1
            self._order = self.epoch_order(self._epoch)
            self._cursor = 0

    def _current_doc(self) -> np.ndarray:
        shard, local = self._order[self._cursor]
        if self._open is None or self._open[0] != shard:
            # One open shard at a time: within an epoch, this rank's documents are grouped by shard.
            data = read_shard(self.path, self.manifest, int(shard))
            name = self.manifest["shards"][shard]["name"]
            self._open = (int(shard), decode_documents(data, self._dtype,
                                                       self._first_keys[shard], name))
        return self._open[1][local]
