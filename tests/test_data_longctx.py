"""Long-context rows (16k here, 1M once): long documents across rows, a long/short mix in a given
ratio with short rows cut into 2k contexts, and memory that stays O(seq_len), not O(data)."""

from __future__ import annotations

import itertools
import tracemalloc

import pytest
import torch
from hymoe.data import Blend, PackedStream, Source
from test_data_helpers import band_of, make_dataset, make_tokenizer, take

S, SHORT = 16_384, 2_048
BANDS = {"long": (2, 150), "short": (150, 300)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("long")
    tok = make_tokenizer(base)
    # 1.25M tokens of 25k..75k-token documents: far more than one row, or a few.
    make_dataset(base / "long", tok, 25, 25_000, 75_000, band=BANDS["long"], shard_tokens=200_000)
    make_dataset(base / "short", tok, 400, 20, 3_000, band=BANDS["short"], shard_tokens=100_000)
    return base


def mix(root, long_weight=1, short_weight=3):
    return Blend({"long": root / "long", "short": Source(root / "short", context_len=SHORT)},
                 {"long": long_weight, "short": short_weight})


def segment_lengths(batch) -> list[int]:
    return batch["cu_seqlens"].diff().tolist()


def test_long_documents_span_rows(root):
    s = PackedStream(root / "long", S, 1, num_streams=1)
    batches = take(s, 8)
    # A 25k+ document fills at least one whole 16k row: one segment, seq_idx all 0.
    whole = [b for b in batches if segment_lengths(b) == [S]]
    assert whole and all(torch.all(b["seq_idx"] == 0) for b in whole)
    for a, b in itertools.pairwise(batches):
        assert a["labels"][0, -1] == b["tokens"][0, 0]  # the document continues in the next row


def test_long_short_mix_in_ratio(root):
    """1:3 long to short rows; short rows are 2k contexts (cut at multiples of 2048 and at
    documents), long rows keep contexts up to the full 16k."""
    s = PackedStream(mix(root), S, 2, num_streams=2)
    kinds = []
    for b in take(s, 12):
        for r in range(2):
            row = b["tokens"][r].tolist()
            kind = band_of(row, BANDS)
            kinds.append(kind)
            idx = b["seq_idx"][r]
            lengths = torch.unique_consecutive(idx, return_counts=True)[1]
            if kind == "short":
                assert lengths.max() <= SHORT
                cuts = torch.nonzero(idx.diff()).flatten() + 1
                assert set(range(SHORT, S, SHORT)) <= set(cuts.tolist())
            else:
                assert lengths.max() > SHORT
    # 24 rows over 2 streams, each within 1 row of its 1:3 share.
    assert abs(kinds.count("long") - 6) <= 2 and len(kinds) == 24
    assert s.blend_tokens() == [{"long": kinds.count("long") * S,
                                 "short": kinds.count("short") * S}]


def test_memory_is_one_row_not_the_dataset(root):
    """Peak numpy memory while making a batch stays a few bytes per row token (the int64 inputs,
    labels and masks being built), plus the fixed 256 KiB buffer of each shard prefetch thread
    hashing a next shard (2 by default) — far below the 2.5 MB of long documents it reads."""
    s = PackedStream(mix(root, 1, 1), S, 1, num_streams=1)
    next(s)  # opens shards, builds the first epoch order
    data_bytes = sum((root / "long" / f.name).stat().st_size
                     for f in (root / "long").glob("shard-*.tar"))
    tracemalloc.start()
    try:
        for _ in range(8):
            tracemalloc.reset_peak()
            next(s)
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < 32 * S + 2 * 2**18, peak  # ~20 bytes per token: int64 rows, labels, masks
    finally:
        tracemalloc.stop()
    assert data_bytes > 2 * (32 * S + 2 * 2**18)


def test_a_million_tokens_per_row(root):
    s = PackedStream(root / "long", 1_048_576, 1, num_streams=1)
    tracemalloc.start()
    try:
        b = next(s)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert b["tokens"].shape == (1, 1_048_576) and peak < 32 * 1_048_576
    assert segment_lengths(b) == torch.unique_consecutive(b["seq_idx"], return_counts=True)[1].tolist()
    assert b["max_seqlen"] > 25_000
