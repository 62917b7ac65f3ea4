"""`prepare`: text files → tokenized webdataset shards + `manifest.json` (+ `tokenizer.json`).

Inputs: paths, directories (every file below, sorted) or globs. A `.jsonl` file holds one document
per line in a string field (`text` unless `text_field` says otherwise); a `.parquet` file one per
row of that column; any other file is one UTF-8 document. Empty documents are dropped.
The output directory is deterministic: the same inputs and settings give byte-identical shards.
An interrupted run resumes where it stopped when re-run with the same arguments.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from hymoe.data import tokenizer as tk
from hymoe.data.errors import DataError
from hymoe.data.manifest import MANIFEST_FILE, VERSION, load_manifest, write_manifest
from hymoe.data.progress import byte_progress
from hymoe.data.shards import DTYPES, dtype_for_vocab, shard_name, write_shard

STATE_FILE = "prepare.state.json"
_CHUNK_BYTES = 1 << 20  # text per tokenizer call: big enough to amortise, small enough to stream


def expand_inputs(inputs: Iterable[str | Path], exclude: Path | None = None) -> list[Path]:
    """Resolve paths / directories / globs to a de-duplicated list of files, in the order given.

    Directories contribute every non-hidden file below them, sorted. Files under `exclude` (the
    output directory, which may sit inside an input directory) are left out.
    """
    files: list[Path] = []
    for pattern in inputs:
        p = Path(os.path.expanduser(str(pattern)))
        if p.is_file():
            matches = [p]
        elif p.is_dir():
            matches = sorted(x for x in p.rglob("*") if x.is_file()
                             and not any(part.startswith(".") for part in x.relative_to(p).parts))
        else:
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
        if not matches:
            raise DataError(
                f"input {str(pattern)!r} matches no files; pass files, directories or globs "
                "such as 'corpus/**/*.jsonl' (quote globs so the shell does not expand them)"
            )
        files.extend(matches)
    skip = exclude.resolve() if exclude is not None else None
    seen: set[Path] = set()
    out = []
    for f in files:
        r = f.resolve()
        if r in seen or (skip is not None and r.is_relative_to(skip)):
            continue
        seen.add(r)
        out.append(f)
    if not out:
        raise DataError(f"inputs {[str(i) for i in inputs]} hold no files outside the output "
                        "directory")
    return out


def iter_documents(files: list[Path], text_field: str = "text") -> Iterator[tuple[str, int]]:
    """Yield (document text, input bytes it came from); the bytes drive the progress bar."""
    for f in files:
        if f.suffix == ".jsonl":
            yield from _jsonl_documents(f, text_field)
        elif f.suffix == ".parquet":
            yield from _parquet_documents(f, text_field)
        else:
            data = f.read_bytes()
            try:
                yield data.decode("utf-8"), len(data)
            except UnicodeDecodeError as e:
                raise DataError(f"{f}: not UTF-8 text (bad byte at offset {e.start}); "
                                "convert it or leave it out of the inputs") from None


def _jsonl_documents(f: Path, text_field: str) -> Iterator[tuple[str, int]]:
    example = f'{{"{text_field}": "..."}}'
    with open(f, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                yield "", len(line)
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{f}:{lineno}: not valid JSON ({e}); each line of a .jsonl "
                                f"input must be an object like {example}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise DataError(f"{f}:{lineno}: no string field {text_field!r}; each line of a "
                                f".jsonl input must be an object like {example} (--text-field "
                                "names another field)")
            yield obj[text_field], len(line)


def _parquet_documents(f: Path, text_field: str) -> Iterator[tuple[str, int]]:
    """Rows of the `text_field` column, read one row group at a time (a parquet file of a real
    corpus is often larger than memory). Progress bytes are the file's size shared over rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{f}: not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{f}: no column {text_field!r} (columns: {', '.join(schema.names)}); "
                        "pass --text-field with the column that holds the text")
    if not (pa.types.is_string(schema.field(text_field).type)
            or pa.types.is_large_string(schema.field(text_field).type)):
        raise DataError(f"{f}: column {text_field!r} is {schema.field(text_field).type}, not "
                        "a string column")
    rows = max(pf.metadata.num_rows, 1)
    per_row, left = divmod(f.stat().st_size, rows)
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            yield text or "", per_row + (1 if row < left else 0)
            row += 1


def _chunks(docs: Iterator[tuple[str, int]], skip: int) -> Iterator[tuple[list[str], int, int]]:
    """Group non-empty documents into (texts, input bytes, skipped bytes) chunks.

    The first `skip` non-empty documents (already in finished shards) are read but not returned.
    """
    texts: list[str] = []
    size = skipped = 0
    for text, nbytes in docs:
        if text and skip > 0:
            skip -= 1
            skipped += nbytes
            continue
        if text:
            texts.append(text)
        size += nbytes
        if size >= _CHUNK_BYTES:
            yield texts, size, skipped
            texts, size, skipped = [], 0, 0
    if texts or size or skipped:
        yield texts, size, skipped


def _text_tokenizer(path: str | Path):
    """The tokenizer as prepare uses it: special-token strings inside a document are plain text.

    Without this, a document that merely mentions "<|endoftext|>" (code about tokenizers, web text)
    would get EOD ids in its middle, i.e. fake document boundaries the loader cannot tell apart.
    """
    tok = tk.load_tokenizer(path)
    tok.encode_special_tokens = True
    return tok


_worker_tok = None


def _init_worker(tok_path: str) -> None:
    global _worker_tok
    # Each worker is one core; the Rust tokenizer's own thread pool would oversubscribe it.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok = _text_tokenizer(tok_path)


def _encode(tok, chunk: tuple[list[str], int, int], dtype: str) -> tuple[list[np.ndarray], int]:
    """Token arrays of a chunk's documents, and the input bytes the chunk covers (for progress)."""
    texts, size, skipped = chunk
    # encode_batch_fast skips computing character offsets, which we never use: ~2x faster.
    encs = tok.encode_batch_fast(texts, add_special_tokens=False)
    return [np.asarray(e.ids, dtype=DTYPES[dtype]) for e in encs], size + skipped


def _encode_in_worker(args: tuple[tuple[list[str], int, int], str]) -> tuple[list[np.ndarray], int]:
    return _encode(_worker_tok, *args)


def _bounded_map(pool: ProcessPoolExecutor, fn, items: Iterable, depth: int) -> Iterator:
    """Ordered map with at most `depth` chunks in flight, so the corpus is never all in RAM."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _split(docs: Iterator[tuple[str, int]], every: int, held_out: bool) -> Iterator[tuple[str, int]]:
    """One side of a train/validation split: non-empty document i (counting non-empty ones) is
    held out when i % every == every - 1. The other side's documents come through blank, so that
    their bytes still count for the progress bar and no other code needs to know of the split."""
    i = 0
    for text, nbytes in docs:
        if text:
            keep = (i % every == every - 1) == held_out
            i += 1
            yield (text if keep else ""), nbytes
        else:
            yield text, nbytes


def _job_key(files: list[Path], shard_tokens: int, tokenizer_spec: str) -> str:
    """Identity of a prepare job: same key ⇒ same output, so a finished or partial run can be reused."""
    desc = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    blob = json.dumps({"inputs": desc, "shard_tokens": shard_tokens, "tokenizer": tokenizer_spec})
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare(
    inputs: list[str],
    output: str | Path,
    tokenizer: str | None = None,
    train_tokenizer_vocab: int | None = None,
    shard_tokens: int = 1_000_000,
    workers: int = 1,
    progress: bool = True,
    text_field: str = "text",
    split: tuple[int, bool] | None = None,
) -> dict:
    """Tokenize `inputs` into shards of about `shard_tokens` tokens in `output`; return the manifest.

    Pass exactly one of `tokenizer` (a tokenizer.json, copied to `<output>/tokenizer.json`) or
    `train_tokenizer_vocab` (train a byte-level BPE of that size on the inputs). `workers > 1`
    tokenizes in that many processes; with 1, the Rust tokenizer may still use several threads
    (set TOKENIZERS_PARALLELISM=false to stop it). Re-running a finished job returns its manifest.
    `text_field`: the jsonl field / parquet column holding each document's text.
    `split=(every, held_out)`: only every `every`-th document (`held_out`), or all the others
    (`prepare_split` writes both sides).
    """
    if (tokenizer is None) == (train_tokenizer_vocab is None):
        raise DataError("pass exactly one of --tokenizer PATH (an existing tokenizer.json) or "
                        "--train-tokenizer VOCAB (train a BPE of that size on the inputs, e.g. 4096)")
    if shard_tokens < 1 or workers < 1:
        raise DataError(f"shard_tokens ({shard_tokens}) and workers ({workers}) must be >= 1")
    out = Path(output)
    files = expand_inputs(inputs, exclude=out)
    out.mkdir(parents=True, exist_ok=True)
    tok_out = out / tk.TOKENIZER_FILE
    spec = f"train:{train_tokenizer_vocab}" if tokenizer is None else tk.fingerprint(tokenizer)
    if text_field != "text":  # part of the job: another field is other documents
        spec += f"|field:{text_field}"
    if split is not None:
        spec += f"|split:{split[0]}:{'held_out' if split[1] else 'rest'}"

    def documents():
        docs = iter_documents(files, text_field)
        return docs if split is None else _split(docs, *split)
    job = _job_key(files, shard_tokens, spec)

    if (out / MANIFEST_FILE).exists():
        m = load_manifest(out)
        if m.get("job") == job:
            return m
        raise DataError(f"{out} already holds a prepared dataset made from other inputs or "
                        "settings; pass a new --output directory or delete this one")
    state = _load_state(out, job, tok_out)
    if state is None:
        if any(out.glob("shard-*.tar")):
            raise DataError(f"{out} holds shards that no manifest describes; pass an empty "
                            "--output directory")
        if tokenizer is not None:
            if Path(tokenizer).resolve() != tok_out.resolve():
                shutil.copyfile(tk.tokenizer_file(tokenizer), tok_out)
        else:
            if progress:
                from rich.console import Console
                Console(stderr=True).print(f"training a {train_tokenizer_vocab}-token BPE on "
                                           f"{len(files)} files…")
            texts = (t for t, _ in documents() if t)
            tk.train_bpe_from_texts(texts, train_tokenizer_vocab, tok_out)
        state = {"job": job, "tokenizer_fingerprint": tk.fingerprint(tok_out), "documents": 0,
                 "shards": []}
        # Written before the first shard, so any shard file in `out` is accounted for by a state.
        _save_state(out, state)

    tok = _text_tokenizer(tok_out)
    vocab, eod = tk.vocab_size(tok), tk.eod_id(tok)
    dtype = dtype_for_vocab(vocab)
    chunks = _chunks(documents(), skip=state["documents"])
    if workers > 1:
        # spawn: forking a process that runs torch or tokenizer threads can deadlock the child.
        # An executor (not multiprocessing.Pool) raises BrokenProcessPool if a worker dies,
        # where Pool would respawn it and wait forever.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(str(tok_out),))
        encoded = _bounded_map(pool, _encode_in_worker, ((c, dtype) for c in chunks), 2 * workers)
    else:
        pool = None
        encoded = (_encode(tok, c, dtype) for c in chunks)

    bar = byte_progress(progress, sum(f.stat().st_size for f in files), "tokenizing")
    pending: list[np.ndarray] = []
    pending_tokens = 0

    def flush() -> None:
        nonlocal pending, pending_tokens
        entry = write_shard(out / shard_name(len(state["shards"])), state["documents"], pending,
                            dtype)
        state["shards"].append(entry)
        state["documents"] += len(pending)
        _save_state(out, state)
        pending, pending_tokens = [], 0

    try:
        if bar:
            bar[0].start()
        for docs, nbytes in encoded:
            for doc in docs:
                pending.append(doc)
                pending_tokens += len(doc)
                if pending_tokens >= shard_tokens:
                    flush()
            if bar:
                bar[0].update(bar[1], advance=nbytes,
                              description=f"tokenizing ({state['documents'] + len(pending)} docs)")
        if pending:
            flush()
    finally:
        if bar:
            bar[0].stop()
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    if not state["shards"]:
        raise DataError(f"inputs {list(inputs)} hold no non-empty documents")
    manifest = _manifest(state["shards"], state["tokenizer_fingerprint"], vocab, eod, dtype, job)
    write_manifest(out, manifest)
    (out / STATE_FILE).unlink()
    return manifest


def prepare_split(inputs: list[str], output: str | Path, valid_every: int, **kwargs) -> tuple[dict, dict]:
    """`prepare` with every `valid_every`-th document held out for validation: the others go to
    `output`, the held-out ones to `output/valid` with the same tokenizer (trained, if asked, on
    the training side only). Two passes over the inputs, each resumable on its own."""
    if valid_every < 2:
        raise DataError(f"--valid-every: must be >= 2 (every N-th document held out), got {valid_every}")
    out = Path(output)
    train = prepare(inputs, out, split=(valid_every, False), **kwargs)
    kwargs.update(tokenizer=str(out / tk.TOKENIZER_FILE), train_tokenizer_vocab=None)
    valid = prepare(inputs, out / "valid", split=(valid_every, True), **kwargs)
    return train, valid


def _manifest(shards: list[dict], fp: str, vocab: int, eod: int, dtype: str, job: str) -> dict:
    return {
        "version": VERSION,
        "tokenizer": {"fingerprint": fp, "vocab_size": vocab, "eod_id": eod,
                      "file": tk.TOKENIZER_FILE},
        "dtype": dtype,
        "shards": shards,
        "totals": {"shards": len(shards), **{k: sum(s[k] for s in shards)
                                            for k in ("documents", "tokens", "bytes")}},
        "job": job,
    }


def write_tokenized(docs: Iterable[np.ndarray], output: str | Path, tokenizer: str | Path,
                    shard_tokens: int = 1_000_000) -> dict:
    """Shards + manifest from documents that are already token ids (1-D integer arrays, no EOD).

    For corpora tokenized elsewhere (e.g. read out of a Megatron .bin/.idx pair), tests and
    benchmarks. `tokenizer` is the tokenizer.json the ids come from (copied into `output`); ids
    must be below its vocabulary size. `output` must not hold a dataset yet.
    """
    out = Path(output)
    if (out / MANIFEST_FILE).exists() or any(out.glob("shard-*.tar")):
        raise DataError(f"{out} already holds a prepared dataset; pass a new output directory")
    out.mkdir(parents=True, exist_ok=True)
    tok_out = out / tk.TOKENIZER_FILE
    if Path(tk.tokenizer_file(tokenizer)).resolve() != tok_out.resolve():
        shutil.copyfile(tk.tokenizer_file(tokenizer), tok_out)
    tok = tk.load_tokenizer(tok_out)
    vocab, eod = tk.vocab_size(tok), tk.eod_id(tok)
    dtype = dtype_for_vocab(vocab)
    shards: list[dict] = []
    pending: list[np.ndarray] = []
    n_docs = pending_tokens = 0
    h = hashlib.sha256()
    for doc in docs:
        doc = np.asarray(doc)
        if doc.ndim != 1 or (len(doc) and (doc.min() < 0 or doc.max() >= vocab)):
            raise DataError(f"document {n_docs + len(pending)}: must be 1-D token ids in "
                            f"[0, {vocab})")
        pending.append(doc)
        pending_tokens += len(doc)
        if pending_tokens >= shard_tokens:
            shards.append(write_shard(out / shard_name(len(shards)), n_docs, pending, dtype))
            n_docs += len(pending)
            pending, pending_tokens = [], 0
    if pending:
        shards.append(write_shard(out / shard_name(len(shards)), n_docs, pending, dtype))
    if not shards:
        raise DataError("write_tokenized: no documents given")
    for s in shards:
        h.update(s["sha256"].encode())
    manifest = _manifest(shards, tk.fingerprint(tok_out), vocab, eod, dtype, h.hexdigest())
    write_manifest(out, manifest)
    return manifest


def _load_state(out: Path, job: str, tok_out: Path) -> dict | None:
    """The state of an interrupted run of the same job, if its tokenizer and shards are intact."""
    f = out / STATE_FILE
    if not f.exists():
        return None
    state = json.loads(f.read_text(encoding="utf-8"))
    if state.get("job") != job:
        raise DataError(f"{out} holds an unfinished run with other inputs or settings; pass a new "
                        f"--output directory or delete this one")
    ok = tok_out.is_file() and tk.fingerprint(tok_out) == state["tokenizer_fingerprint"] and all(
        (out / s["name"]).is_file() and (out / s["name"]).stat().st_size == s["bytes"]
        for s in state["shards"])
    if not ok:
        raise DataError(f"{out}: the unfinished run's tokenizer or shards changed since; "
                        "delete the directory and prepare again")
    return state


def _save_state(out: Path, state: dict) -> None:
    tmp = out / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state), encoding="utf-8")
    os.replace(tmp, out / STATE_FILE)


def prepare_demo(output: str | Path, vocab_size: int = 2048, max_bytes: int = 3_000_000,
                 progress: bool = True) -> dict:
    """The embedded demo corpus (the Python stdlib's own source) tokenized into ``output`` with a
    BPE trained on it. Small shards (250k tokens) so that shard-level shuffling has a few to mix."""
    from hymoe.data.corpus import demo_corpus_files

    files = demo_corpus_files(max_bytes)
    return prepare([str(f) for f in files], output, train_tokenizer_vocab=vocab_size,
                   shard_tokens=250_000, workers=1, progress=progress)


def prepare_demo_valid(output: str | Path, tokenizer: str | Path, train_max_bytes: int,
                       max_bytes: int = 200_000, progress: bool = True) -> dict:
    """Held-out demo documents (stdlib files the `train_max_bytes` demo corpus leaves out)
    tokenized into ``output`` with the training data's ``tokenizer`` (its tokenizer.json): the
    demo's validation set."""
    from hymoe.data.corpus import heldout_corpus_files

    files = heldout_corpus_files(train_max_bytes, max_bytes)
    return prepare([str(f) for f in files], output, tokenizer=str(tokenizer),
                   shard_tokens=250_000, workers=1, progress=progress)
