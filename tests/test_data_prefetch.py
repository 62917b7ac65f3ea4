"""Shard prefetching (data/prefetch.py): the shard a stream reads next is checked in a background
thread, once, and nothing a stream yields or raises depends on it — the batches, states, metrics
and errors are those of a loader that checks each shard when it gets there."""

from __future__ import annotations

import os
import threading
from collections import Counter
from concurrent.futures import wait

import pytest
from hymoe.data import DataError, PackedStream
from hymoe.data import reader as reader_mod
from hymoe.data.config import DataConfig
from hymoe.data.order import Dataset
from hymoe.data.reader import ShardCache
from test_data_helpers import assert_same, make_dataset, make_tokenizer, take
from test_data_integrity import damage

S, B = 32, 2


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    base = tmp_path_factory.mktemp("prefetch")
    path, docs = make_dataset(base / "d", make_tokenizer(base), 100, 5, 30, shard_tokens=150)
    return path, docs


def cache_of(stream: PackedStream) -> ShardCache:
    return next(iter(stream._live.values())).sub(0).cache


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """8 shards of 60k tokens (12 documents of 5000): each larger than what a stream packs ahead
    at once (32k), as real shards (~10⁸ tokens) are, so a refill enters one new shard at most."""
    base = tmp_path_factory.mktemp("prefetch_large")
    return make_dataset(base / "d", make_tokenizer(base), 96, 5000, 5000, shard_tokens=60_000)[0]


def test_each_shard_is_hashed_once_and_ahead_of_its_stream(large, monkeypatch):
    hashed = []
    real = reader_mod.sha256_file

    def spy(path):
        hashed.append((path.name, threading.current_thread().name))
        return real(path)

    monkeypatch.setattr(reader_mod, "sha256_file", spy)
    s = PackedStream(large, 1024, 2, num_streams=1)
    n_shards = len(s.manifest["shards"])
    assert n_shards == 8 and {x["tokens"] for x in s.manifest["shards"]} == {60_000}
    for _ in range(s.manifest["totals"]["tokens"] // 2048 + 20):  # more than an epoch
        wait(list(cache_of(s)._pending.values()))  # the prefetch thread is done with what it has
        next(s)
    names = Counter(name for name, _ in hashed)
    assert len(names) == n_shards and set(names.values()) == {1}
    # The stream never reached a shard that was not checked already: every hash ran in a thread.
    assert all(t.startswith("hymoe-shard-prefetch-") for _, t in hashed)


def test_without_prefetch_the_stream_hashes_inline(clean, monkeypatch):
    threads = []
    real = reader_mod.sha256_file
    monkeypatch.setattr(reader_mod, "sha256_file",
                        lambda p: threads.append(threading.current_thread().name) or real(p))
    take(PackedStream(clean[0], S, B, num_streams=1, shard_prefetch_threads=0), 40)
    assert threads and set(threads) == {threading.main_thread().name}


@pytest.mark.parametrize("kind", ["truncated", "payload", "header"])
def test_corrupt_shards_fail_at_the_same_batch_with_the_same_message(clean, tmp_path, kind):
    d, name, key, _ = damage(clean[0], tmp_path, kind)
    outcomes = []
    for threads in (0, 1, 2):
        got = []
        with pytest.raises(DataError) as e:  # a truncated shard: already when the stream starts
            s = PackedStream(d, S, B, num_streams=2, shard_prefetch_threads=threads)
            for _ in range(100):
                got.append(next(s))
        outcomes.append((got, str(e.value)))
    for got, message in outcomes[1:]:
        assert_same(got, outcomes[0][0])
        assert message == outcomes[0][1] and name in message and key in message


def test_skipping_is_unchanged_by_prefetch(clean, tmp_path):
    d, *_ = damage(clean[0], tmp_path, "payload")
    runs = []
    for threads in (0, 1, 2):
        s = PackedStream(d, S, B, num_streams=3, on_corrupt="skip", shard_prefetch_threads=threads)
        runs.append((take(s, 60), s.state_dict(), s.metrics()))
    assert runs[0][2]["data/skipped_shards"] >= 1
    for batches, state, metrics in runs[1:]:
        assert_same(batches, runs[0][0])
        assert state == runs[0][1] and metrics == runs[0][2]


def test_resume_and_workers_are_unchanged_by_prefetch(clean):
    ref = PackedStream(clean[0], S, B, num_streams=4, shard_prefetch_threads=0)
    first, state = take(ref, 40), ref.state_dict()
    after = take(ref, 8)
    s = PackedStream(clean[0], S, B, num_streams=4, num_workers=2, shard_prefetch_threads=2)
    assert_same(take(s, 40), first)
    s.close()
    r = PackedStream(clean[0], S, B, num_streams=4, shard_prefetch_threads=1)
    r.load_state_dict(state)
    assert_same(take(r, 8), after)


def test_a_needed_shard_is_not_queued_behind_other_jobs(clean):
    """A job still waiting in the queue when its shard is opened is cancelled and the check runs
    inline: opening never waits for other shards' checks."""
    from hymoe.data.blend import Source

    ds = Dataset("d", Source(clean[0]))
    cache = ShardCache(prefetch_threads=1)
    release = threading.Event()
    blocker = cache._prefetcher.submit(release.wait, 60)  # the thread is busy until released
    cache.prefetch(ds, 2)
    job = cache._pending[(str(ds.path), 2)]
    shard = cache.open(ds, 2)
    assert job.cancelled() and not blocker.done()  # opened while the thread was still busy
    assert len(shard.starts) == ds.shards[2]["documents"]
    cache.prefetch(ds, 3)  # queued behind the blocker; closing the stream drops it
    queued = cache._pending[(str(ds.path), 3)]
    cache.cancel_prefetch()
    assert queued.cancelled() and not cache._pending
    release.set()
    assert blocker.result(timeout=60) is True


def test_config_rejects_negative_threads():
    with pytest.raises(DataError, match="data.shard_prefetch_threads"):
        DataConfig(path="x", shard_prefetch_threads=-1).validate()



def test_a_shard_changed_after_its_check_is_checked_again(clean, tmp_path):
    """A shard replaced or deleted between the background check and the open is not trusted on
    the old verdict: it is checked again (and a deleted one is reported missing)."""
    import shutil

    from hymoe.data.blend import Source

    d = tmp_path / "d"
    shutil.copytree(clean[0], d)
    ds = Dataset("d", Source(d))
    cache = ShardCache(prefetch_threads=1)
    cache.prefetch(ds, 1)
    wait([cache._pending[(str(ds.path), 1)]])
    (d / ds.shards[1]["name"]).unlink()
    with pytest.raises(DataError, match="shard missing"):
        cache.open(ds, 1)
    cache.prefetch(ds, 2)
    wait([cache._pending[(str(ds.path), 2)]])
    p = d / ds.shards[2]["name"]
    data = bytearray(p.read_bytes())
    data[600] ^= 0x01  # same size, another mtime: the earlier verdict no longer holds
    before = p.stat().st_mtime_ns
    p.write_bytes(bytes(data))
    os.utime(p, ns=(before + 10**9, before + 10**9))  # whatever the file system's mtime resolution
    with pytest.raises(DataError, match="corrupt shard"):
        cache.open(ds, 2)
