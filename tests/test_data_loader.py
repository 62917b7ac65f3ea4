"""PackedStream (hymoe.data.loader): packing, document masks, stream split, determinism, workers,
exact resume (the 40-batches-then-8 test) and resume on another DP size."""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest
import torch
from hymoe.data import DataError, PackedStream
from test_data_helpers import EOD, assert_same, make_dataset, make_tokenizer, rows, take

S, B = 32, 2


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def dataset(tok, tmp_path_factory):
    """120 documents of 3..30 tokens in ~10 shards: a stream's epoch is a few rows."""
    return make_dataset(tmp_path_factory.mktemp("ds") / "d", tok, 120, 3, 30)


def stream(path, **kw):
    kw = {"seq_len": S, "micro_batch": B, "num_streams": 4, **kw}
    return PackedStream(path, **kw)


def test_shapes_dtypes_and_shift(dataset):
    path, _ = dataset
    s = stream(path, num_streams=1)
    assert s.tokens_per_batch == B * S
    b1, b2 = take(s, 2)
    want = {"tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32,
            "seq_idx": torch.int32, "cu_seqlens": torch.int32, "max_seqlen": torch.int32}
    assert {k: v.dtype for k, v in b1.items()} == want
    assert all(b1[k].shape == (B, S) for k in ("tokens", "labels", "loss_mask", "seq_idx"))
    assert torch.equal(b1["labels"][:, :-1], b1["tokens"][:, 1:])
    # One stream: rows and batches are consecutive windows, nothing dropped between them.
    assert torch.equal(b1["labels"][:-1, -1], b1["tokens"][1:, 0])
    assert b1["labels"][-1, -1] == b2["tokens"][0, 0]
    assert torch.all(b1["loss_mask"] == 1.0)


def segments_from_cu(batch) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) token ranges that cu_seqlens makes of it."""
    cu = batch["cu_seqlens"].tolist()
    Bn, Sn = batch["tokens"].shape
    assert cu[0] == 0 and cu[-1] == Bn * Sn and cu == sorted(set(cu))
    out = [[] for _ in range(Bn)]
    for a, b in itertools.pairwise(cu):
        row = a // Sn
        assert (b - 1) // Sn == row, "a segment crosses a row"
        out[row].append((a - row * Sn, b - row * Sn))
    return out


def test_document_masks(dataset):
    """seq_idx, cu_seqlens and max_seqlen describe the same segments: each is one document with
    its EOD (or the part of one a row boundary cut); attention built from them never crosses."""
    path, _ = dataset
    for batch in take(stream(path), 6):
        segs = segments_from_cu(batch)
        assert batch["max_seqlen"] == max(b - a for row in segs for a, b in row)
        for r, (toks, idx) in enumerate(zip(batch["tokens"].tolist(), batch["seq_idx"].tolist())):
            want, doc = [], 0
            for t in toks:
                want.append(doc)
                doc += t == EOD
            assert idx == want
            assert [(a, b) for a, b in segs[r]] == [
                (idx.index(k), len(idx) - idx[::-1].index(k)) for k in sorted(set(idx))]
            for a, b in segs[r][:-1]:
                assert toks[b - 1] == EOD  # a segment ends with its document's EOD
        # The dense mask a kernel would build from cu_seqlens: causal and block-diagonal.
        cu = batch["cu_seqlens"]
        seg_of = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff().long())
        pos = torch.arange(len(seg_of))
        mask = (seg_of[:, None] == seg_of[None, :]) & (pos[:, None] >= pos[None, :])
        flat_idx = batch["seq_idx"].flatten()
        row_of = pos // S
        same = (row_of[:, None] == row_of[None, :]) & (flat_idx[:, None] == flat_idx[None, :])
        assert torch.equal(mask, same & (pos[:, None] >= pos[None, :]))
    assert any((b["tokens"] == EOD).any() for b in take(stream(path), 3))


def test_eod_mask_loss(dataset):
    path, _ = dataset
    for batch in take(stream(path, eod_mask_loss=True), 5):
        assert torch.equal(batch["loss_mask"] == 0, batch["tokens"] == EOD)


def test_streams_cover_each_epoch_once(dataset):
    path, docs = dataset
    s = stream(path, num_streams=5)
    for epoch in (0, 1):
        parts = [s.epoch_documents("data", v, epoch) for v in range(5)]
        keys = [tuple(x) for p in parts for x in p.tolist()]
        assert len(keys) == len(set(keys)) == len(docs)
    e0 = np.concatenate([s.epoch_documents("data", v, 0) for v in range(5)])
    e1 = np.concatenate([s.epoch_documents("data", v, 1) for v in range(5)])
    assert not np.array_equal(e0, e1)  # reshuffled every epoch
    r0, r1 = (stream(path, num_streams=5, dp_rank=r, dp_size=2).rank_streams for r in (0, 1))
    assert (r0, r1) == ([0, 2, 4], [1, 3])


def test_rows_are_the_documents_in_order(dataset):
    """One stream's rows, joined, are its epoch's documents with an EOD after each."""
    path, docs = dataset
    s = stream(path, num_streams=1)
    flat: list[int] = []
    for b in take(s, 60):
        flat += b["tokens"].flatten().tolist()
    m = s.manifest
    first = np.cumsum([0] + [x["documents"] for x in m["shards"]])
    want: list[int] = []
    for epoch in (0, 1, 2):
        for shard, i in s.epoch_documents("data", 0, epoch).tolist():
            want += docs[first[shard] + i].tolist() + [EOD]
    n = min(len(flat), len(want))
    assert n == len(flat) and flat == want[:n]


def test_seed_determinism(dataset):
    path, _ = dataset
    assert_same(take(stream(path, seed=3), 5), take(stream(path, seed=3), 5))
    a, b = take(stream(path, seed=3), 5), take(stream(path, seed=4), 5)
    assert not all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))


def test_workers_do_not_change_rows(dataset):
    path, _ = dataset
    ref = take(stream(path, micro_batch=3), 12)
    for workers in (2, 3):
        with stream(path, micro_batch=3, num_workers=workers) as s:
            assert s.workers == workers
            assert_same(take(s, 12), ref)


@pytest.mark.parametrize("dp_size", [1, 2])
def test_resume_40_then_8_with_workers(dataset, dp_size):
    """torchtitan's data-loader checkpoint test: 40 batches, save, restore in a fresh stream, the
    next 8 equal an uninterrupted run — with 2 worker processes reading ahead on each rank."""
    path, _ = dataset
    for rank in range(dp_size):
        kw = {"dp_rank": rank, "dp_size": dp_size, "seed": 7}
        reference = take(stream(path, **kw), 48)  # crosses shards and epochs
        with stream(path, num_workers=2, **kw) as first:
            assert_same(take(first, 40), reference[:40])
            time.sleep(0.2)  # let the workers fill their queues: the state must not count those
            state = json.loads(json.dumps(first.state_dict()))  # any checkpointer keeps it
        with stream(path, num_workers=2, **kw) as restored:
            restored.load_state_dict(state)
            assert_same(take(restored, 8), reference[40:])
            assert restored.epoch >= 1
        # The state counts what the consumer received, not what the workers read ahead.
        plain = stream(path, **kw)
        take(plain, 40)
        assert plain.state_dict() == state


def test_resume_refuses_what_it_cannot_continue(dataset, tok, tmp_path):
    path, _ = dataset
    s = stream(path, dp_rank=0, dp_size=2)
    take(s, 3)
    state = s.state_dict()
    with pytest.raises(DataError, match="load_rank_states"):
        stream(path).load_state_dict(state)
    with pytest.raises(DataError, match="'seed'"):
        stream(path, dp_size=2, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="num_streams"):
        stream(path, dp_size=2, num_streams=2).load_state_dict(state)
    other, _ = make_dataset(tmp_path / "other", tok, 120, 3, 30, seed=5)
    with pytest.raises(DataError, match="'dataset'"):
        stream(other, dp_size=2).load_state_dict(state)
    with pytest.raises(DataError, match="version 1"):
        stream(path, dp_size=2).load_state_dict({**state, "version": 1})
    with pytest.raises(DataError, match="one state per rank"):
        stream(path).load_rank_states([state])


@pytest.mark.parametrize("new_dp", [1, 4])
def test_dp_change_repeats_and_skips_nothing(dataset, new_dp):
    """4 streams on dp=2 for 3 batches, then on dp=1 or dp=4: the rows of all ranks, before and
    after, are exactly those of a run that read the same number of rows from every stream."""
    path, _ = dataset
    old = [stream(path, dp_rank=r, dp_size=2) for r in range(2)]
    before = sum((rows(take(s, 3)) for s in old), rows([]))  # 3 rows from each stream
    states = {str(r): json.loads(json.dumps(s.state_dict())) for r, s in enumerate(old)}
    new = [stream(path, dp_rank=r, dp_size=new_dp) for r in range(new_dp)]
    msgs = [s.load_rank_states(states) for s in new]
    assert all("dp_size=2" in m and f"dp_size={new_dp}" in m for m in msgs)
    assert all(s.tokens == 2 * 3 * B * S for s in new)
    after = sum((rows(take(s, 4 // new_dp * 2)) for s in new), rows([]))  # 4 more per stream
    reference = rows(take(stream(path), 14))  # dp=1: 28 rows, 7 from each stream
    assert before + after == reference
    # And a second resume on the new layout is exact as usual.
    s = new[0]
    state = s.state_dict()
    nxt = take(s, 2)
    again = stream(path, dp_rank=0, dp_size=new_dp)
    again.load_rank_states({str(r): (state if r == 0 else x.state_dict())
                            for r, x in enumerate(new)})
    assert_same(take(again, 2), nxt)


def test_dp_change_needs_enough_streams(dataset):
    path, _ = dataset
    states = [stream(path, num_streams=2, dp_rank=r, dp_size=2).state_dict() for r in range(2)]
    with pytest.raises(DataError, match="num_streams=2 is smaller than dp_size=4"):
        stream(path, num_streams=0, dp_size=4).load_rank_states(states)


def test_wrong_tokenizer_fingerprint(dataset):
    path, _ = dataset
    fp = stream(path).manifest["tokenizer"]["fingerprint"]
    stream(path, tokenizer_fingerprint=fp)
    with pytest.raises(DataError, match="tokenizer"):
        stream(path, tokenizer_fingerprint="0" * 64)
