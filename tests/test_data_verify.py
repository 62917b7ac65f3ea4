"""`hymoe data verify` (data/verify.py): the same lines, in shard order, whatever the number of
threads; the manifest's own counts are checked on shards whose bytes match; memory stays flat."""

from __future__ import annotations

import json
import tracemalloc

from hymoe.data import verify
from hymoe.data.manifest import load_manifest
from hymoe.data.shards import read_members
from test_data_helpers import make_dataset, make_tokenizer


def dataset(tmp_path):
    return make_dataset(tmp_path / "d", make_tokenizer(tmp_path), 120, 5, 60, shard_tokens=400)[0]


def test_lines_are_in_shard_order_for_any_number_of_threads(tmp_path):
    d = dataset(tmp_path)
    m = load_manifest(d)
    assert len(m["shards"]) >= 8
    damaged = [m["shards"][i]["name"] for i in (1, 4, 6)]
    for k, name in enumerate(damaged):
        data = bytearray((d / name).read_bytes())
        if k == 0:
            data = data[: len(data) // 2]  # truncated
        elif k == 1:
            data[read_members(bytes(data), name)[1][1]] ^= 0x01  # one payload bit
        else:
            at = read_members(bytes(data), name)[1][1] - 512  # the second member's header
            data[at : at + 100] = b"\xab" * 100
        (d / name).write_bytes(bytes(data))
    (d / m["shards"][7]["name"]).unlink()
    one = verify(d, workers=1)
    assert [line.split(":")[0] for line in one if not line.startswith(damaged[0])] == \
        [damaged[1]] * 2 + [damaged[2]] * 2 + [m["shards"][7]["name"]]
    assert one[0].startswith(damaged[0]) and any("unreadable" in x for x in one if damaged[2] in x)
    for workers in (2, 8):
        assert verify(d, workers=workers) == one


def test_manifest_counts_are_checked_when_the_bytes_match(tmp_path):
    d = dataset(tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    s = m["shards"][2]
    s["documents"] += 1
    s["tokens"] -= 3
    m["totals"]["documents"] += 1
    m["totals"]["tokens"] -= 3
    (d / "manifest.json").write_text(json.dumps(m))
    docs, tokens = s["documents"] - 1, s["tokens"] + 3
    assert verify(d) == [f"{s['name']}: {docs} samples, manifest says {s['documents']}",
                         f"{s['name']}: {tokens} tokens, manifest says {s['tokens']}"]


def test_memory_stays_flat(tmp_path):
    """Shards are read through memory maps: verifying allocates far less than the data."""
    big = make_dataset(tmp_path / "big", make_tokenizer(tmp_path), 300, 500, 1500,
                       shard_tokens=10**6)[0]
    total = load_manifest(big)["totals"]["bytes"]
    assert len(load_manifest(big)["shards"]) == 1 and total > 400_000  # read whole: > peak bound
    tracemalloc.start()
    try:
        assert verify(big, workers=4) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < total / 4, (peak, total)
