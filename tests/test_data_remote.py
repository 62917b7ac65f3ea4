"""Remote datasets (hymoe.data.remote): a prepared directory served over HTTP, or read through a
`pipe:` command, streams exactly the batches of the local directory; a damaged remote shard is an
error naming its URL and the sample (or skipped and counted with on_corrupt=skip); `verify` works on
a URL; a failing command says which and why."""

from __future__ import annotations

import contextlib
import functools
import http.server
import random
import shutil
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from hymoe.data import DataError, verify
from hymoe.data.blend import blend_from_config
from hymoe.data.loader import PackedStream
from hymoe.data.manifest import load_manifest
from hymoe.data.prepare import prepare
from hymoe.data.shards import read_members


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("HYMOE_DATA_CACHE", str(tmp_path / "mirror"))
    return tmp_path / "mirror"


@pytest.fixture(scope="module")
def prepared(demo_data, tmp_path_factory):
    """A small dataset of several shards (the demo tokenizer, synthetic text)."""
    rng = random.Random(0)
    src = tmp_path_factory.mktemp("remote_src")
    words = ["def", "return", "class", "import", "self", "(x)", ":", "\n", "    ", "value"]
    for i in range(40):
        (src / f"d{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(rng.randint(50, 400))))
    out = tmp_path_factory.mktemp("remote_data") / "web"
    prepare([str(src)], out, tokenizer=str(demo_data / "tokenizer.json"), shard_tokens=3000,
            progress=False)
    assert len(load_manifest(out)["shards"]) >= 4
    return out


@pytest.fixture
def served(prepared, tmp_path):
    """A copy of the dataset served on localhost: (url, the served directory)."""
    root = tmp_path / "www"
    shutil.copytree(prepared, root / "web")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/web", root / "web"
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def batches(location, n=6, **kw):
    s = PackedStream(location, seq_len=128, micro_batch=2, seed=3, **kw)
    return [next(s) for _ in range(n)], s


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert np.array_equal(x[k].numpy(), y[k].numpy()), k


def test_http_and_pipe_stream_the_local_batches(prepared, served, mirror):
    url, directory = served
    local, _ = batches(prepared)
    same(batches(url)[0], local)
    same(batches(f"pipe:cat {directory}/{{}}")[0], local)
    # What was read sits in one mirror folder per location, complete files only.
    assert len(list(mirror.iterdir())) == 2
    assert not list(mirror.rglob("*.tmp"))


def test_damaged_remote_shard_names_the_url_and_is_fetched_again(served, mirror):
    url, directory = served
    m = load_manifest(directory)
    name = m["shards"][0]["name"]
    good = (directory / name).read_bytes()
    bad = bytearray(good)
    bad[read_members(good, name)[1][1]] ^= 0x01  # one bit of the second document
    (directory / name).write_bytes(bytes(bad))
    with pytest.raises(DataError, match=rf"{url}/{name}: corrupt shard: .*sample"):
        batches(url, n=80, num_streams=1)
    _, s = batches(url, n=80, num_streams=1, on_corrupt="skip")
    assert s.metrics()["data/skipped_shards"] >= 1
    # Repaired at the source: the broken copy was dropped from the mirror, so it is fetched anew.
    (directory / name).write_bytes(good)
    batches(url, n=80, num_streams=1)


def test_shards_are_fetched_ahead_and_a_failed_fetch_surfaces_where_the_stream_reads(
        served, mirror, monkeypatch):
    """The prefetch thread downloads the shard a stream reads next; when that download fails, the
    error is raised where the stream reaches the shard, as without prefetching."""
    from concurrent.futures import wait

    from hymoe.data import stream as stream_mod

    monkeypatch.setattr(stream_mod, "_FILL_TOKENS", 256)  # pack 2 rows ahead: shards stay apart
    url, directory = served

    def settle(s):  # let the prefetch thread finish what it was given
        for st in s._live.values():
            wait(list(st.sub(0).cache._pending.values()))

    _, s = batches(url, n=1, num_streams=1)
    settle(s)
    cache = s._live[0].sub(0).cache
    opened = {p.name for p in mirror.rglob("shard-*.tar")}
    assert len(opened) == len(cache._open) + 1  # and the next one, not opened yet
    # Now a shard in the middle of the order cannot be fetched.
    order = [int(i) for i in s.epoch_documents("data", 0, 0)[:, 0]]
    gone = load_manifest(directory)["shards"][order[-1]]["name"]
    (directory / gone).unlink()
    results = []
    for threads in (0, 1):
        shutil.rmtree(mirror)
        s = PackedStream(url, seq_len=128, micro_batch=2, seed=3, num_streams=1,
                         shard_prefetch_threads=threads)
        got = []
        with pytest.raises(DataError, match=rf"{url}/{gone}: could not fetch") as e:
            for _ in range(200):
                got.append(next(s))
                settle(s)
        results.append((got, str(e.value)))
    assert results[0][1] == results[1][1] and len(results[0][0]) > 2
    same(results[1][0], results[0][0])


def test_the_mirror_keeps_at_most_its_limit_and_loses_nothing(prepared, served, mirror,
                                                              monkeypatch):
    """With $HYMOE_DATA_CACHE_GB the mirror's shards stay under the limit (plus the one being
    fetched) while the stream reads more than an epoch; trimmed shards are fetched again when
    needed, and the batches are those of the local directory."""
    from concurrent.futures import wait

    from hymoe.data import stream as stream_mod

    monkeypatch.setattr(stream_mod, "_FILL_TOKENS", 256)  # pack 2 rows ahead: shards stay apart
    url, _ = served
    m = load_manifest(prepared)
    biggest = max(s["bytes"] for s in m["shards"])
    limit = int(2.5 * biggest)
    monkeypatch.setenv("HYMOE_DATA_CACHE_GB", str(limit / 1e9))
    n = (m["totals"]["tokens"] + m["totals"]["documents"]) // 256 + 20  # more than an epoch
    local, _ = batches(prepared, n=n, num_streams=1)
    def held() -> int:
        total = 0
        for p in mirror.rglob("*.tar"):  # a prefetch thread may trim one meanwhile
            with contextlib.suppress(FileNotFoundError):
                total += p.stat().st_size
        return total

    s = PackedStream(url, seq_len=128, micro_batch=2, seed=3, num_streams=1)
    got = []
    for _ in range(n):
        got.append(next(s))
        # Over the limit only by shards whose fetch just ended (2 threads and the stream itself).
        assert held() <= limit + 3 * biggest
    same(got, local)
    wait(list(s._live[0].sub(0).cache._pending.values()))
    assert held() <= limit + biggest  # each fetch trims to the limit, keeping only itself over it
    assert len(list(mirror.rglob("*.tar"))) < len(m["shards"])  # some were trimmed
    monkeypatch.setenv("HYMOE_DATA_CACHE_GB", "lots")
    with pytest.raises(DataError, match="HYMOE_DATA_CACHE_GB='lots'"):
        PackedStream(url, seq_len=128, micro_batch=2)


def test_verify_a_url(served, mirror):
    url, directory = served
    assert verify(url) == []
    name = load_manifest(directory)["shards"][-1]["name"]
    data = (directory / name).read_bytes()
    (directory / name).write_bytes(data[: len(data) // 2])
    problems = verify(url)
    assert problems and all(p.startswith(name) for p in problems)
    (directory / name).unlink()
    assert any(p.startswith(f"{name}: {url}/{name}: could not fetch") for p in verify(url))


def test_bad_locations_say_what_to_do(tmp_path, mirror):
    with pytest.raises(DataError, match=r"pipe:false manifest.json: exited with 1"):
        PackedStream("pipe:false {}", seq_len=8, micro_batch=1)
    with pytest.raises(DataError, match=r"needs '\{\}' where the file name goes"):
        PackedStream("pipe:cat manifest.json", seq_len=8, micro_batch=1)
    with pytest.raises(DataError, match=r"http://127.0.0.1:9/nowhere/manifest.json: could not fetch"):
        PackedStream("http://127.0.0.1:9/nowhere", seq_len=8, micro_batch=1)


def test_datasets_relative_to_a_remote_base():
    d = SimpleNamespace
    cfg = d(path="https://example.org/corpus", blend={"web": 1, "code": 1}, phases=[],
            datasets={"web": d(path="web", context_len=None), "code": d(path="s3code", context_len=None),
                      "abs": d(path="pipe:cat /x/{}", context_len=4096)})
    sources = blend_from_config(cfg).sources
    assert [s.path for s in sources] == [
        "https://example.org/corpus/web", "https://example.org/corpus/s3code", "pipe:cat /x/{}"]


def test_a_shard_trimmed_between_check_and_open_is_fetched_again(served, mirror, monkeypatch):
    """Another process's trim can delete a mirror's shard after this process checked it and before
    it maps it: the shard is fetched and checked again, not reported missing."""
    from hymoe.data import reader as reader_mod
    from hymoe.data.blend import Source
    from hymoe.data.order import Dataset

    url, _ = served
    ds = Dataset("web", Source(url))
    real, calls = reader_mod.map_file, []

    def trimmed_first(path):
        calls.append(path)
        if len(calls) == 1:
            path.unlink()  # as a trim elsewhere would
            raise FileNotFoundError(path)
        return real(path)

    monkeypatch.setattr(reader_mod, "map_file", trimmed_first)
    shard = reader_mod.ShardCache().open(ds, 1)
    assert len(calls) == 2 and len(shard.starts) == ds.shards[1]["documents"]
