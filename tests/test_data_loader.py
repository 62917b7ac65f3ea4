"""PackedStream (hymoe.data.loader): packing, DP split, determinism, resume, integrity checks."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from hymoe.data import DataError, PackedStream, load_tokenizer
from hymoe.data.prepare import prepare
from hymoe.data.shards import read_members

EOD = 0
S, B = 32, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """50 short unique documents in several shards: one epoch is fewer than 12 batches of B x S."""
    base = tmp_path_factory.mktemp("loader")
    rng = random.Random(1)
    words = ["one", "two", "three", "four", "x", "=", "(", ")", "\n", "é", "和"]
    texts = [f"doc {i} " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 20)))
             for i in range(50)]
    src = base / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    m = prepare([str(src)], base / "out", train_tokenizer_vocab=300, shard_tokens=200,
                progress=False)
    assert len(m["shards"]) >= 4
    assert m["totals"]["tokens"] + m["totals"]["documents"] < 10 * B * S
    return base / "out", texts, m


def take(stream, n):
    return [next(stream) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_shapes_dtypes_and_shift(dataset):
    path, _, _ = dataset
    s = PackedStream(path, seq_len=S, micro_batch=B)
    assert s.tokens_per_batch == B * S
    b1, b2 = take(s, 2)
    want = {"tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32,
            "seq_idx": torch.int32}
    assert {k: v.dtype for k, v in b1.items()} == want
    assert all(v.shape == (B, S) for v in b1.values())
    assert torch.equal(b1["labels"][:, :-1], b1["tokens"][:, 1:])
    # Rows and batches are consecutive windows of one stream: nothing is dropped between them.
    assert torch.equal(b1["labels"][:-1, -1], b1["tokens"][1:, 0])
    assert b1["labels"][-1, -1] == b2["tokens"][0, 0]
    assert torch.all(b1["loss_mask"] == 1.0)


def test_seq_idx_increments_after_each_eod(dataset):
    path, _, _ = dataset
    for batch in take(PackedStream(path, seq_len=S, micro_batch=B), 8):
        for row_tokens, row_idx in zip(batch["tokens"].tolist(), batch["seq_idx"].tolist()):
            doc, want = 0, []
            for t in row_tokens:
                want.append(doc)
                doc += t == EOD
            assert row_idx == want
    assert any((b["tokens"] == EOD).any() for b in take(PackedStream(path, S, B), 3))


def rank_epoch_documents(path, tok, rank, size, seed=0) -> list[str]:
    """Decode the documents one DP rank reads in its first epoch, from its batches alone."""
    stream = PackedStream(path, seq_len=S, micro_batch=B, dp_rank=rank, dp_size=size, seed=seed)
    n_docs = len(stream.epoch_order(0))
    flat: list[int] = []
    while flat.count(EOD) < n_docs:
        flat += next(stream)["tokens"].flatten().tolist()
    docs, cur = [], []
    for t in flat:
        if t == EOD:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    return docs[:n_docs]


def test_dp_ranks_split_documents(dataset):
    path, texts, _ = dataset
    tok = load_tokenizer(path)
    r0, r1 = (rank_epoch_documents(path, tok, r, 2) for r in (0, 1))
    assert not set(r0) & set(r1)
    assert sorted(r0 + r1) == sorted(texts)
    assert rank_epoch_documents(path, tok, 0, 1) != texts  # shuffled, not in prepare order


def test_seed_determinism(dataset):
    path, _, _ = dataset
    assert_same(take(PackedStream(path, S, B, seed=3), 5), take(PackedStream(path, S, B, seed=3), 5))
    a, b = take(PackedStream(path, S, B, seed=3), 5), take(PackedStream(path, S, B, seed=4), 5)
    assert not all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))


@pytest.mark.parametrize("dp_rank,dp_size", [(0, 1), (1, 2)])
def test_resume_is_exact(dataset, dp_rank, dp_size):
    path, _, _ = dataset
    kw = {"seq_len": S, "micro_batch": B, "dp_rank": dp_rank, "dp_size": dp_size, "seed": 7}
    reference = take(PackedStream(path, **kw), 12)  # crosses shard and epoch boundaries
    first = PackedStream(path, **kw)
    take(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # plain types survive any checkpointer
    restored = PackedStream(path, **kw)
    restored.load_state_dict(state)
    assert_same(take(restored, 5), reference[7:])
    assert restored.epoch >= 1


def test_resume_refuses_other_layout(dataset):
    path, _, _ = dataset
    state = PackedStream(path, S, B, dp_rank=0, dp_size=2).state_dict()
    with pytest.raises(DataError, match="'dp_size'"):
        PackedStream(path, S, B).load_state_dict(state)


def test_wrong_tokenizer_fingerprint(dataset):
    path, _, m = dataset
    PackedStream(path, S, B, tokenizer_fingerprint=m["tokenizer"]["fingerprint"])
    with pytest.raises(DataError, match="tokenizer"):
        PackedStream(path, S, B, tokenizer_fingerprint="0" * 64)


def test_corrupted_shard_is_named(dataset, tmp_path):
    path, _, m = dataset
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    name = m["shards"][0]["name"]
    data = bytearray((bad / name).read_bytes())
    data[read_members(bytes(data), name)[0][1]] ^= 0xFF  # first token: same size, other hash
    (bad / name).write_bytes(bytes(data))
    s = PackedStream(bad, S, B)
    with pytest.raises(DataError, match=name):
        take(s, 40)  # one epoch or so: every shard gets opened
    (bad / name).write_bytes(bytes(data[:1000]))
    with pytest.raises(DataError, match=name):
        PackedStream(bad, S, B)
