"""Corruption in the loader (not only in `verify`): a truncated shard, garbage in a payload and
garbage over a tar header stop the stream with the shard and sample named, or, with
`on_corrupt="skip"`, are skipped and counted."""

from __future__ import annotations

import re
import shutil

import pytest
from hymoe.data import DataError, PackedStream, verify
from hymoe.data.manifest import first_keys
from hymoe.data.shards import member_name, read_members
from test_data_helpers import EOD, make_dataset, make_tokenizer, take

S, B = 32, 2
BAD = 3  # the damaged shard
SAMPLE = re.compile(r"sample \d{9}")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    base = tmp_path_factory.mktemp("integrity")
    path, docs = make_dataset(base / "d", make_tokenizer(base), 100, 5, 30, shard_tokens=150)
    return path, docs


def damage(clean_path, tmp_path, kind):
    """A copy with shard BAD damaged; returns (dir, shard name, key of the damaged sample)."""
    d = tmp_path / kind
    shutil.copytree(clean_path, d)
    from hymoe.data import load_manifest
    m = load_manifest(d)
    name = m["shards"][BAD]["name"]
    p = d / name
    data = bytearray(p.read_bytes())
    members = read_members(bytes(data), name)
    key = member_name(first_keys(m)[BAD] + 1)
    if kind == "truncated":
        data = data[: members[1][1] + 4]  # in the middle of the second sample
    elif kind == "payload":  # out-of-vocabulary ids in the second sample
        data[members[1][1] : members[1][1] + 4] = b"\xab" * 4
    elif kind == "payload-in-range":  # one id changes to another valid id: only sha256 sees it
        data[members[1][1]] ^= 0x01
    else:  # garbage over the second sample's tar header
        data[members[1][1] - 512 : members[1][1] - 412] = b"\xab" * 100
    p.write_bytes(bytes(data))
    return d, name, key, m


def read_epoch(stream, n_batches=60):
    return take(stream, n_batches)


@pytest.mark.parametrize("kind", ["truncated", "payload", "header"])
def test_error_names_shard_and_sample(clean, tmp_path, kind):
    d, name, key, _ = damage(clean[0], tmp_path, kind)
    with pytest.raises(DataError) as e:
        read_epoch(PackedStream(d, S, B, num_streams=2))
    msg = str(e.value)
    assert name in msg and f"sample {key}" in msg and "on_corrupt=skip" in msg, msg
    assert any(line.startswith(f"{name}: ") and key in line for line in verify(d))


def test_payload_damage_with_valid_ids_names_the_range(clean, tmp_path):
    d, name, _, m = damage(clean[0], tmp_path, "payload-in-range")
    with pytest.raises(DataError, match=rf"{name}.*sha256.*payload damage in one of samples "
                                        rf"{member_name(first_keys(m)[BAD])}…"):
        read_epoch(PackedStream(d, S, B, num_streams=2))


def test_error_comes_through_workers(clean, tmp_path):
    d, name, key, _ = damage(clean[0], tmp_path, "header")
    with PackedStream(d, S, B, num_streams=2, num_workers=2) as s, \
            pytest.raises(DataError, match=rf"{name}.*sample {key}"):
        read_epoch(s)


@pytest.mark.parametrize("kind", ["truncated", "payload", "header"])
def test_skip_reads_everything_else_and_counts(clean, tmp_path, kind):
    """One stream, one epoch: the documents read are exactly the dataset minus the bad shard's,
    and the metrics count one skipped shard and its documents."""
    path, docs = clean
    d, _, _, m = damage(path, tmp_path, kind)
    s = PackedStream(d, S, B, num_streams=1, on_corrupt="skip")
    n_bad = m["shards"][BAD]["documents"]
    want = len(docs) - n_bad
    flat: list[int] = []
    while flat.count(EOD) < want:
        flat += next(s)["tokens"].flatten().tolist()
    got, cur = [], []
    for t in flat:
        if t == EOD:
            got.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    first = first_keys(m)[BAD]
    expected = {tuple(x.tolist()) for i, x in enumerate(docs) if not first <= i < first + n_bad}
    assert set(got[:want]) == expected and len(got[:want]) == want
    metrics = s.metrics()
    assert metrics["data/skipped_shards"] == 1 and metrics["data/skipped_documents"] == n_bad
    # The counts are part of the state, so they survive a resume.
    r = PackedStream(d, S, B, num_streams=1, on_corrupt="skip")
    r.load_state_dict(s.state_dict())
    assert r.metrics()["data/skipped_documents"] == n_bad


def test_all_shards_corrupt_is_an_error(clean, tmp_path):
    d = tmp_path / "all"
    shutil.copytree(clean[0], d)
    for p in d.glob("shard-*.tar"):
        data = bytearray(p.read_bytes())
        data[512] ^= 0x01  # the first payload: same size, another hash
        p.write_bytes(bytes(data))
    with pytest.raises(DataError, match="every shard"):
        next(PackedStream(d, S, B, num_streams=1, on_corrupt="skip"))
