"""Helpers for the data tests (no tests here): synthetic token datasets whose rows say where they
came from, built with `write_tokenized` in milliseconds (no tokenizer run)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from hymoe.data import train_bpe
from hymoe.data.prepare import write_tokenized

EOD = 0  # id of <|endoftext|> in every tokenizer trained by hymoe
VOCAB = 300


def make_tokenizer(directory: Path) -> Path:
    """A byte-level BPE with at least VOCAB ids (only its id range and fingerprint matter)."""
    text = directory / "t.txt"
    text.write_text(" ".join(f"w{i} x{i % 7}" for i in range(3000)))
    tok = train_bpe([text], VOCAB, directory / "tokenizer.json")
    assert json.loads(tok.read_text())["model"]["vocab"]
    return tok


def make_docs(n: int, lo: int, hi: int, band: tuple[int, int], seed: int) -> list[np.ndarray]:
    """`n` documents of lengths in [lo, hi] with ids in `band`; each starts with a unique pair
    (its index), so a document can be recognised in a row."""
    rng = np.random.default_rng(seed)
    docs = []
    width = band[1] - band[0]
    for i in range(n):
        head = [band[0] + i // width, band[0] + i % width]
        body = rng.integers(band[0], band[1], int(rng.integers(max(lo - 2, 0), hi - 1)))
        docs.append(np.concatenate([head, body]).astype(np.int64))
    return docs


def make_dataset(out: Path, tokenizer: Path, n: int, lo: int, hi: int, band=(2, VOCAB), seed=0,
                 shard_tokens: int = 200) -> tuple[Path, list[np.ndarray]]:
    docs = make_docs(n, lo, hi, band, seed)
    write_tokenized(docs, out, tokenizer, shard_tokens=shard_tokens)
    return out, docs


def take(stream, n: int) -> list[dict]:
    return [next(stream) for _ in range(n)]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys(), i
        for k in x:
            assert torch.equal(x[k], y[k]), (i, k)


def rows(batches: list[dict]) -> Counter:
    """Multiset of rows (input tokens plus the last label) over batches."""
    out: Counter = Counter()
    for b in batches:
        full = torch.cat([b["tokens"], b["labels"][:, -1:]], dim=1)
        out.update(tuple(r) for r in full.tolist())
    return out


def band_of(row: list[int], bands: dict[str, tuple[int, int]]) -> str:
    """Which dataset a row came from, by the id band of its non-EOD tokens (all must agree)."""
    names = {n for t in row if t != EOD for n, (a, b) in bands.items() if a <= t < b}
    assert len(names) == 1, names
    return names.pop()
