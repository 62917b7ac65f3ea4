"""Data pipeline throughput, one run on one corpus (the embedded demo corpus: the Python stdlib):

1. prepare (tokenize → shards + manifest, one process) vs the tokenizer alone on the same texts;
2. streamed tokens/s of `PackedStream` (one process, with the default 64 streams and with one; and
   its consumer with 2 reader workers) vs
   - a raw sequential read of the same shard bytes: from the page cache (bytes only; and bytes →
     int64 [B, S] batches, the least work any loader must do; and bytes → the same batch contract
     as PackedStream's, made the straightforward way) and from disk (cache dropped),
   - the same shards on an HTTP server limited to each `--remote-mb-per-s` per connection (an
     object store's stream; benchmarks/http_server.py): a sequential download vs PackedStream
     reading the URL from an empty mirror, with its shard prefetch threads (the default 2, and
     1: one connection, as the download) and without,
   - megatron-core's own indexed dataset built from the same tokens (`IndexedDatasetBuilder` →
     .bin/.idx): read document by document with `IndexedDataset.get` and packed like ours, and
     megatron's `GPTDataset` on top of it (its sample index, shuffling and batches of samples).

Each rate is the best of `--repeats` runs of `--seconds`, in two clocks: wall time, and CPU time of
this process (tokens per CPU-second: what one process does with a core to itself — the machines
that run this are shared, and CPU time is what contention disturbs least). Reads from disk or the
HTTP server and the worker-process row are wall time only. The streams and the raw read into
batches are measured in turns (2·repeats+1 rounds) and compared by the median of their per-round
ratios, which load on the machine moves least. Goals (issue 6): ≥ 5 M tokens/s per process
streamed and ≥ 80% of the raw read.

    python benchmarks/data.py [--max-bytes 10000000] [--seq-len 4096] [--micro-batch 4]
                              [--remote-mb-per-s 90 400] [--json F]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process = one core, for both sides

import numpy as np


def rate(fn, seconds: float, repeats: int) -> tuple[float, float]:
    """(best tokens per wall second, best tokens per CPU second); `fn()` returns its tokens."""
    wall = cpu = 0.0
    for _ in range(repeats):
        tokens, w0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - w0 < seconds:
            tokens += fn()
        w, c = time.perf_counter() - w0, time.process_time() - c0
        wall, cpu = max(wall, tokens / w), max(cpu, tokens / max(c, 1e-9))
    return wall, cpu


def packer(docs_iter_factory, seq_len: int, micro_batch: int, eod: int | None = None):
    """A function that makes one [B, S] int64 batch (inputs and labels, contiguous) from an endless
    stream of token arrays, rows overlapping by one token as in PackedStream, and returns B * S.

    With `eod`, the documents get an EOD each and the batch is PackedStream's whole contract
    (loss mask, seq_idx, cu_seqlens, max_seqlen; segment starts found by scanning for EODs): the
    least any packing loader must do, without order, blending, resume or integrity checks."""
    if eod is not None:
        import torch

        plain, end = docs_iter_factory, np.array([eod])

        def docs_iter_factory():
            for d in plain():
                yield d
                yield end
    state = {"it": iter(()), "cur": np.zeros(0, np.uint16), "off": 0, "carry": None}
    need = seq_len + 1

    def one() -> int:
        x = np.empty((micro_batch, need), dtype=np.int64)
        for r in range(micro_batch):
            filled = 0
            if state["carry"] is not None:
                x[r, 0] = state["carry"]
                filled = 1
            while filled < need:
                cur, off = state["cur"], state["off"]
                if off == len(cur):
                    cur = next(state["it"], None)
                    if cur is None:
                        state["it"] = docs_iter_factory()
                        cur = next(state["it"])
                    state["cur"], off = cur, 0
                take = min(need - filled, len(cur) - off)
                x[r, filled : filled + take] = cur[off : off + take]
                filled += take
                state["off"] = off + take
            state["carry"] = x[r, -1]
        tokens, labels = np.ascontiguousarray(x[:, :-1]), np.ascontiguousarray(x[:, 1:])
        if eod is not None:  # one scan for EODs; every row starts a segment too
            e = np.flatnonzero(tokens[:, :-1] == eod)
            rows = e // (seq_len - 1)
            starts = np.concatenate([np.arange(micro_batch) * seq_len,
                                     rows * seq_len + e % (seq_len - 1) + 1])
            starts.sort()
            cu = np.append(starts, micro_batch * seq_len).astype(np.int32)
            lengths = np.diff(cu)
            first = np.searchsorted(starts, np.arange(micro_batch) * seq_len)  # row's first segment
            seg = (np.arange(len(starts)) - first[starts // seq_len]).astype(np.int32)
            seq_idx = np.repeat(seg, lengths).reshape(micro_batch, seq_len)
            torch.from_numpy(tokens), torch.from_numpy(labels), torch.ones(micro_batch, seq_len)
            torch.from_numpy(seq_idx), torch.from_numpy(cu), torch.tensor(int(lengths.max()))
        return micro_batch * seq_len

    return one


def evict(paths: list[Path]) -> None:
    """Drop our own files from the page cache (POSIX_FADV_DONTNEED; no root, others unaffected)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drain(make_stream, tokens: int, S: int, B: int) -> float:
    """Tokens per wall second of a fresh stream reading `tokens` tokens (opening included)."""
    t0 = time.perf_counter()
    s, n = make_stream(), 0
    while n < tokens:
        next(s)
        n += S * B
    rate_ = n / (time.perf_counter() - t0)
    s.close()
    return rate_


def cold_rates(shards: list[Path], prepared: Path, tokens: int, S: int, B: int,
               repeats: int) -> tuple[float, float, float]:
    """One pass from disk (wall time): raw sequential read vs a fresh PackedStream reading as many
    tokens as one epoch holds (manifest, open, sha256 check, pack), with its default shard
    prefetch threads and without. Best of `repeats` passes: (raw, hymoe, hymoe without prefetch)."""
    from hymoe.data import PackedStream

    raw, hy = 0.0, [0.0, 0.0]
    for _ in range(repeats):
        gc.collect()  # no mapping of an earlier stream may keep pages in memory
        evict(shards)
        t0 = time.perf_counter()
        for p in shards:
            with open(p, "rb") as f:
                f.read()
        raw = max(raw, tokens / (time.perf_counter() - t0))
        for i, kw in enumerate(({}, {"shard_prefetch_threads": 0})):
            gc.collect()
            evict(shards)
            hy[i] = max(hy[i], drain(lambda: PackedStream(prepared, S, B, **kw), tokens, S, B))
    return raw, *hy


def remote_rates(prepared: Path, m: dict, tokens: int, S: int, B: int, mb_per_s: float,
                 repeats: int) -> tuple[float, float, float, float]:
    """The dataset on an HTTP server limited to `mb_per_s` per connection (benchmarks/
    http_server.py, its own process), read once from an empty mirror (wall time): a sequential
    download of its shards vs a fresh PackedStream of the URL reading as many tokens as one epoch
    holds (manifest, fetch, sha256 check, pack), with its default shard prefetch threads (one
    connection each), with one (one connection, as the download) and without. Best of `repeats`:
    (raw, hymoe, hymoe with one thread, without)."""
    import subprocess
    import sys
    import urllib.request

    from hymoe.data import PackedStream

    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("http_server.py")),
                               str(prepared), "--mb-per-s", str(mb_per_s)],
                              stdout=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{int(server.stdout.readline())}"
    old_cache = os.environ.get("HYMOE_DATA_CACHE")
    raw, hy = 0.0, [0.0, 0.0, 0.0]
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for entry in m["shards"]:
                with urllib.request.urlopen(f"{url}/{entry['name']}") as r:
                    while r.read(1 << 20):
                        pass
            raw = max(raw, tokens / (time.perf_counter() - t0))
            for i, kw in enumerate(({}, {"shard_prefetch_threads": 1},
                                    {"shard_prefetch_threads": 0})):
                mirror = Path(tempfile.mkdtemp(prefix="hymoe-bench-mirror-"))
                os.environ["HYMOE_DATA_CACHE"] = str(mirror)
                hy[i] = max(hy[i], drain(lambda: PackedStream(url, S, B, **kw), tokens, S, B))
                shutil.rmtree(mirror)
    finally:
        server.kill()
        server.wait()
        if old_cache is None:
            os.environ.pop("HYMOE_DATA_CACHE", None)
        else:
            os.environ["HYMOE_DATA_CACHE"] = old_cache
    return raw, *hy


def stream_rate(prepared: Path, S: int, B: int, workers: int, seconds: float,
                repeats: int) -> tuple[float, float]:
    from hymoe.data import PackedStream

    with PackedStream(prepared, S, B, num_workers=workers) as s:
        next(s)  # opens the first shards; with workers, starts them
        return rate(lambda: (next(s), S * B)[1], seconds, repeats)


def alternating(raw, streams: dict, batches: int) -> dict:
    """CPU time of each stream relative to `raw`, taking one batch of each in turn: both then find
    their data as cold in the CPU caches as a loader does between two training steps (a tight
    loop keeps the small bare read's working set cached). {name: raw time / stream time}."""
    t_raw, t = 0.0, dict.fromkeys(streams, 0.0)
    for _ in range(batches):
        for name, s in streams.items():
            a = time.process_time()
            raw()
            b = time.process_time()
            next(s)
            t_raw += b - a
            t[name] += time.process_time() - b
    return {k: t_raw / len(streams) / v for k, v in t.items()}


def interleaved(fns: dict, seconds: float, repeats: int) -> tuple[dict, dict]:
    """Rates of several functions measured in turns (A, B, C, A, B, C, …), so that each round
    compares them under the same load: ({name: best (wall, cpu)}, {name: median over rounds of
    its CPU rate / the first function's})."""
    rounds = [{k: rate(f, seconds, 1) for k, f in fns.items()} for _ in range(repeats)]
    first = next(iter(fns))
    best = {k: (max(r[k][0] for r in rounds), max(r[k][1] for r in rounds)) for k in fns}
    ratio = {k: sorted(r[k][1] / r[first][1] for r in rounds)[len(rounds) // 2] for k in fns}
    return best, ratio


def tokenize_and_prepare(files: list[Path], tok_path: Path, out: Path, repeats: int):
    """(tokens, tokenizer-alone rate, prepare rate, manifest); rates as (wall, cpu), best runs."""
    from hymoe.data import load_tokenizer
    from hymoe.data.prepare import iter_documents, prepare

    tok = load_tokenizer(tok_path)
    tok.encode_special_tokens = True
    texts = [t for t, _ in iter_documents(files) if t]
    tok_rate, prep_rate = (0.0, 0.0), (0.0, 0.0)
    for _ in range(repeats):
        w0, c0, n_tok, chunk, size = time.perf_counter(), time.process_time(), 0, [], 0
        for t in texts + [None]:  # 1 MB chunks, as prepare feeds the tokenizer
            if t is not None:
                chunk.append(t)
                size += len(t)
            if chunk and (t is None or size >= 1 << 20):
                n_tok += sum(len(e.ids) for e in tok.encode_batch_fast(chunk,
                                                                       add_special_tokens=False))
                chunk, size = [], 0
        w, c = time.perf_counter() - w0, time.process_time() - c0
        tok_rate = (max(tok_rate[0], n_tok / w), max(tok_rate[1], n_tok / c))
        if out.exists():
            shutil.rmtree(out)
        w0, c0 = time.perf_counter(), time.process_time()
        m = prepare([str(f) for f in files], out, tokenizer=str(tok_path), shard_tokens=1_000_000,
                    workers=1, progress=False)
        w, c = time.perf_counter() - w0, time.process_time() - c0
        prep_rate = (max(prep_rate[0], n_tok / w), max(prep_rate[1], n_tok / c))
        assert m["totals"]["tokens"] == n_tok
    return n_tok, tok_rate, prep_rate, m


def megatron_indexed(shards: list[Path], m: dict, work: Path) -> str:
    """.bin/.idx of the same documents, each with its EOD (preprocess_data.py --append-eod)."""
    import torch
    from hymoe.data.shards import decode_documents
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    eod = m["tokenizer"]["eod_id"]
    prefix = str(work / "megatron_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    first = 0
    for p, sh in zip(shards, m["shards"]):
        for d in decode_documents(p.read_bytes(), m["dtype"], first, sh["name"]):
            builder.add_document(torch.from_numpy(np.append(d, eod).astype(np.int64)), [len(d) + 1])
        first += sh["documents"]
    builder.finalize(prefix + ".idx")
    return prefix


def megatron_gpt(prefix: str, S: int, B: int, eod: int, vocab: int, work: Path, seconds: float,
                 repeats: int) -> tuple[float, float]:
    """megatron-core's GPTDataset (built by BlendedMegatronDatasetBuilder, as Megatron-LM does)
    over the .bin/.idx; batches are B consecutive samples of its shuffled sample index."""
    import torch
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    tokenizer = SimpleNamespace(eod=eod, pad=-1, vocab_size=vocab, eos=eod, special_tokens_dict={},
                                unique_identifiers={"class": "hymoe-bench"})
    cfg = GPTDatasetConfig(
        random_seed=0, sequence_length=S, blend=([prefix], None), split="100,0,0",
        path_to_cache=str(work / "megatron_cache"), tokenizer=tokenizer,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False,
    )
    n = 200_000_000 // S  # samples: many epochs of the corpus
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [n, 0, 0], lambda: True, cfg).build()
    i = 0

    def one() -> int:
        nonlocal i
        samples = [train[(i + b) % len(train)] for b in range(B)]
        i += B
        torch.stack([x["tokens"] for x in samples]), torch.stack([x["labels"] for x in samples])
        return B * S

    return rate(one, seconds, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-bytes", type=int, default=10_000_000)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--remote-mb-per-s", type=float, nargs="+", default=[90.0, 400.0],
                    help="per-connection rates of the HTTP server standing in for an object store "
                         "(S3's guidance: one concurrent request per 85-90 MB/s), one pass each")
    ap.add_argument("--workdir", default=None, help="keeps the trained tokenizer between runs")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import torch
    from hymoe.data import demo_corpus_files
    from hymoe.data.tokenizer import train_bpe
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    torch.set_num_threads(1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hymoe-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    S, B, sec, rep = args.seq_len, args.micro_batch, args.seconds, args.repeats
    r: dict[str, tuple[float, float] | tuple[float]] = {}

    files = demo_corpus_files(args.max_bytes)
    tok_path = work / "tokenizer.json"
    if not tok_path.exists():
        train_bpe(files, args.vocab, tok_path)
    out = work / "prepared"
    n_tok, r["tokenizer"], r["prepare"], m = tokenize_and_prepare(files, tok_path, out,
                                                                  min(rep, 2))

    shards = [out / s["name"] for s in m["shards"]]
    stream_tokens = m["totals"]["tokens"] + m["totals"]["documents"]  # one EOD per document
    r["raw_cold"], r["hymoe_cold"], r["hymoe_cold_inline"] = (
        (v,) for v in cold_rates(shards, out, stream_tokens, S, B, rep))
    for mbps in args.remote_mb_per_s:
        keys = [f"{k}@{mbps:g}" for k in ("raw_remote", "hymoe_remote", "hymoe_remote_1",
                                           "hymoe_remote_inline")]
        r.update(zip(keys, ((v,) for v in remote_rates(out, m, stream_tokens, S, B, mbps, rep))))
    for p in shards:
        p.read_bytes()  # warm the page cache for everything below

    def raw_bytes() -> int:
        for p in shards:
            with open(p, "rb") as f:
                f.read()
        return stream_tokens

    r["raw"] = rate(raw_bytes, sec, rep)

    def raw_docs():
        return (np.frombuffer(p.read_bytes(), dtype=np.uint16) for p in shards)

    def raw_payloads():  # the documents themselves (tar headers are no tokens to scan for EODs)
        from hymoe.data.shards import member_spans

        for p in shards:
            data = p.read_bytes()
            tokens = np.frombuffer(data, dtype=np.uint16)
            for start, size in zip(*(a.tolist() for a in member_spans(data))):
                yield tokens[start // 2 : (start + size) // 2]

    from hymoe.data import PackedStream

    streams = {n: PackedStream(out, S, B, num_streams=n) for n in (0, 1)}
    for s in streams.values():
        next(s)  # opens the first shards
    eod = m["tokenizer"]["eod_id"]
    best, ratios = interleaved({"raw_batches": packer(raw_docs, S, B),
                                "raw_contract": packer(raw_payloads, S, B, eod),
                                "hymoe": lambda: (next(streams[0]), S * B)[1],
                                "hymoe_1": lambda: (next(streams[1]), S * B)[1]}, sec, 2 * rep + 1)
    r.update(best)
    ratios.update({f"{k}_alternating": v for k, v in alternating(
        packer(raw_docs, S, B), {k: streams[n] for k, n in (("hymoe", 0), ("hymoe_1", 1))},
        4000).items()})
    r["hymoe_workers"] = (stream_rate(out, S, B, 2, sec, rep)[0],)

    prefix = megatron_indexed(shards, m, work)
    idx = IndexedDataset(prefix)
    assert int(idx.sequence_lengths.sum()) == stream_tokens
    for p in (prefix + ".bin", prefix + ".idx"):
        Path(p).read_bytes()
    r["megatron_indexed"] = rate(packer(lambda: (idx.get(i) for i in range(len(idx))), S, B),
                                 sec, rep)
    r["megatron_gpt"] = megatron_gpt(prefix, S, B, m["tokenizer"]["eod_id"],
                                     m["tokenizer"]["vocab_size"], work, sec, rep)
    report(r, ratios, args, files, n_tok, m)


LABELS = {
    "tokenizer": "tokenizer alone (encode_batch_fast, 1 thread)",
    "prepare": "hymoe data prepare (1 worker)",
    "raw": "raw sequential read, page cache (bytes)",
    "raw_batches": "raw read -> int64 [B, S] batches, page cache",
    "raw_contract": "raw read -> PackedStream's batch contract",
    "raw_cold": "raw sequential read from disk (cache dropped)",
    "hymoe_cold": "hymoe PackedStream from disk (cache dropped)",
    "hymoe_cold_inline": "the same, shard_prefetch_threads=0",
    "hymoe": "hymoe PackedStream, 1 process, page cache",
    "hymoe_1": "the same, data.num_streams=1 (long spans)",
    "hymoe_workers": "hymoe PackedStream consumer, 2 workers",
    "megatron_indexed": "megatron IndexedDataset.get + same packing",
    "megatron_gpt": "megatron GPTDataset samples -> batches",
}


def report(r: dict, ratios: dict, args, files: list, n_tok: int, m: dict) -> None:
    S, B = args.seq_len, args.micro_batch
    print(f"\ncorpus: {len(files)} files ({sum(f.stat().st_size for f in files) / 1e6:.1f} MB), "
          f"{n_tok / 1e6:.2f} M tokens (vocab {m['tokenizer']['vocab_size']}), "
          f"{len(m['shards'])} shards; seq_len {S}, micro_batch {B}; best of {args.repeats}\n")
    print(f"| {'what':<46} | {'M tok/s wall':>12} | {'M tok/s per CPU-s':>17} |")
    print(f"| {'-' * 46} | {'-' * 12} | {'-' * 17} |")
    labels = dict(LABELS)
    for mbps in args.remote_mb_per_s:
        labels[f"raw_remote@{mbps:g}"] = f"raw sequential download, HTTP {mbps:g} MB/s"
        labels[f"hymoe_remote@{mbps:g}"] = "hymoe PackedStream of the URL, empty mirror"
        labels[f"hymoe_remote_1@{mbps:g}"] = "the same, shard_prefetch_threads=1"
        labels[f"hymoe_remote_inline@{mbps:g}"] = "the same, shard_prefetch_threads=0"
    for key, label in labels.items():
        v = r[key]
        cpu = f"{v[1] / 1e6:.1f}" if len(v) > 1 else ""
        print(f"| {label:<46} | {v[0] / 1e6:>12.1f} | {cpu:>17} |")
    hy, raw = r["hymoe"][1], r["raw"][1]
    print(f"\nprepare / tokenizer alone: {r['prepare'][1] / r['tokenizer'][1]:.0%} (CPU time)")
    print(f"goal ≥ 5 M tokens/s per process: {'met' if hy >= 5e6 else 'NOT met'} "
          f"({hy / 1e6:.0f} M per CPU-second, {r['hymoe'][0] / 1e6:.0f} M wall)")
    print(f"goal ≥ 80% of the raw read: {hy / raw:.1%} of the cached byte read, "
          f"{ratios['hymoe']:.0%} of the cached read into int64 batches ({ratios['hymoe_1']:.0%} "
          "with one stream; CPU time, median over rounds measured in turns); batch by batch in "
          f"turns {ratios['hymoe_alternating']:.0%} ({ratios['hymoe_1_alternating']:.0%} with one "
          "stream), "
          f"{r['hymoe_cold'][0] / r['raw_cold'][0]:.0%} of the read from disk (wall; "
          f"{r['hymoe_cold_inline'][0] / r['raw_cold'][0]:.0%} without shard prefetch)")
    for mbps in args.remote_mb_per_s:
        raw_r = r[f"raw_remote@{mbps:g}"][0]
        print(f"  from an HTTP server at {mbps:g} MB/s per connection (wall): "
              f"{r[f'hymoe_remote@{mbps:g}'][0] / raw_r:.0%} of its sequential download "
              f"({r[f'hymoe_remote_inline@{mbps:g}'][0] / raw_r:.0%} without shard prefetch, "
              f"{r[f'hymoe_remote_1@{mbps:g}'][0] / raw_r:.0%} with one thread: one connection, "
              "as the download)")
    contract = ratios["raw_contract"]
    print(f"vs the raw read into the same batch contract (no order, blend, resume or checks): "
          f"{ratios['hymoe'] / contract:.0%} ({ratios['hymoe_1'] / contract:.0%} with one stream)")
    print(f"vs megatron-core: {hy / r['megatron_indexed'][1]:.2f}x IndexedDataset + packing, "
          f"{hy / r['megatron_gpt'][1]:.2f}x GPTDataset (CPU time)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rates": {k: list(v) for k, v in r.items()},
                                               "ratios_to_raw_batches": ratios}, indent=1))


if __name__ == "__main__":
    main()
