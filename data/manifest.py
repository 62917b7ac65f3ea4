"""`manifest.json`: what a prepared directory holds, and what is wrong with a shard against it.

    {"version": 1,
     "tokenizer": {"fingerprint": sha256 hex of tokenizer.json, "vocab_size": int, "eod_id": int,
                   "file": "tokenizer.json"},
     "dtype": "uint16" | "uint32",
     "shards": [{"name": "shard-000000.tar", "documents": int, "tokens": int, "bytes": int,
                 "sha256": hex}, ...],
     "totals": {"shards": int, "documents": int, "tokens": int, "bytes": int},
     "job": sha256 hex of the inputs and settings that made it (lets `prepare` skip a finished job)}

`tokens` counts document tokens only; the loader adds one EOD per document on top.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from hymoe.data.errors import DataError
from hymoe.data.remote import fetch, is_remote
from hymoe.data.shards import DTYPES, iter_members, member_name, member_spans, sha256_bytes

MANIFEST_FILE = "manifest.json"
VERSION = 1
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def manifest_path(path: str | Path) -> Path:
    """A prepared directory or its manifest file → the manifest file."""
    p = Path(path)
    return p if p.suffix == ".json" else p / MANIFEST_FILE


def load_manifest(path: str | Path) -> dict:
    """Read and validate a manifest (from a prepared directory or the json file itself, or a
    remote dataset: fetched into its mirror, see hymoe.data.remote)."""
    if is_remote(path):
        path = fetch(path, MANIFEST_FILE, refresh=True)
    f = manifest_path(path)
    if not f.is_file():
        raise DataError(f"{f}: no manifest; is {f.parent} a directory made by `hymoe data prepare`?")
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{f}: not valid JSON ({e}); re-run `hymoe data prepare`") from None
    validate_manifest(m, str(f))
    return m


def _check(cond: bool, where: str, field: str, msg: str) -> None:
    if not cond:
        raise DataError(f"{where}: field '{field}' {msg}")


def _int(d: dict, key: str, where: str, field: str, minimum: int = 0) -> int:
    v = d.get(key)
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= minimum
    _check(ok, where, field, f"must be an integer >= {minimum}, got {v!r}")
    return v


def validate_manifest(m: object, where: str = MANIFEST_FILE) -> None:
    """Raise `DataError` naming `where` and the field (e.g. `shards[3].sha256`) for the first problem."""
    _check(isinstance(m, dict), where, "<root>", "must be a JSON object")
    _check(m.get("version") == VERSION, where, "version", f"must be {VERSION}, got {m.get('version')!r}")
    tok = m.get("tokenizer")
    _check(isinstance(tok, dict), where, "tokenizer", "must be an object")
    fp = tok.get("fingerprint")
    _check(isinstance(fp, str) and bool(_HEX64.match(fp)), where, "tokenizer.fingerprint",
           "must be a sha256 hex string")
    vocab = _int(tok, "vocab_size", where, "tokenizer.vocab_size", 1)
    eod = _int(tok, "eod_id", where, "tokenizer.eod_id")
    _check(eod < vocab, where, "tokenizer.eod_id", f"{eod} is not below vocab_size {vocab}")
    _check(isinstance(tok.get("file"), str), where, "tokenizer.file", "must be a file name")
    _check(m.get("dtype") in DTYPES, where, "dtype", f"must be one of {sorted(DTYPES)}")
    _check(vocab <= 65535 or m["dtype"] == "uint32", where, "dtype",
           f"{m['dtype']} cannot hold vocab_size {vocab}")
    shards = m.get("shards")
    _check(isinstance(shards, list) and len(shards) > 0, where, "shards", "must be a non-empty list")
    for i, s in enumerate(shards):
        f = f"shards[{i}]"
        _check(isinstance(s, dict), where, f, "must be an object")
        name = s.get("name")
        _check(isinstance(name, str) and name != "" and "/" not in name and "\\" not in name,
               where, f"{f}.name", "must be a plain file name")
        _int(s, "documents", where, f"{f}.documents")
        _int(s, "tokens", where, f"{f}.tokens")
        _int(s, "bytes", where, f"{f}.bytes", 1)
        sha = s.get("sha256")
        _check(isinstance(sha, str) and bool(_HEX64.match(sha)), where, f"{f}.sha256",
               "must be a sha256 hex string")
    totals = m.get("totals")
    _check(isinstance(totals, dict), where, "totals", "must be an object")
    n = _int(totals, "shards", where, "totals.shards")
    _check(n == len(shards), where, "totals.shards", f"is {n} but there are {len(shards)} shards")
    for key in ("documents", "tokens", "bytes"):
        got = _int(totals, key, where, f"totals.{key}")
        want = sum(s[key] for s in shards)
        _check(got == want, where, f"totals.{key}", f"is {got} but the shards add up to {want}")


def write_manifest(directory: Path, m: dict) -> Path:
    """Write atomically (temp file + rename): a manifest is the mark of a finished directory."""
    f = directory / MANIFEST_FILE
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_text(json.dumps(m, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, f)
    return f


def first_keys(m: dict) -> list[int]:
    """Global index of each shard's first document (shard members are keyed by it)."""
    out, k = [], 0
    for s in m["shards"]:
        out.append(k)
        k += s["documents"]
    return out


def shard_problems(data: bytes | memoryview, m: dict, index: int) -> list[str]:
    """What is wrong with shard `index`'s bytes `data` against the manifest `m`; [] if nothing.

    Each line names the sample (`000000042`, the document's global key) where the damage is
    known: a damaged tar header or a truncation is located by the strict tar walk, a token id
    outside the vocabulary by its sample. Garbage inside a payload that keeps ids in range is only
    visible to the shard's sha256 (tar has no per-member checksum), so then the line names the
    range of samples the shard holds.
    """
    s, first = m["shards"][index], first_keys(m)[index]
    name, dtype, vocab = s["name"], m["dtype"], m["tokenizer"]["vocab_size"]
    problems: list[str] = []
    if len(data) != s["bytes"]:
        problems.append(f"size is {len(data)} bytes, manifest says {s['bytes']}")
    digest = sha256_bytes(data)
    hash_ok = digest == s["sha256"]
    if not hash_ok:
        problems.append(f"sha256 is {digest[:16]}…, manifest says {s['sha256'][:16]}…")
    elif not problems:
        # The bytes are the ones `prepare` wrote and hashed, so their tar headers and token ids are
        # as written: only the manifest's own counts are left to check (the loader's check too).
        starts, sizes = member_spans(data)
        if len(starts) != s["documents"]:
            problems.append(f"{len(starts)} samples, manifest says {s['documents']}")
        tokens = int(sizes.sum()) // DTYPES[dtype].itemsize
        if tokens != s["tokens"]:
            problems.append(f"{tokens} tokens, manifest says {s['tokens']}")
        return problems
    docs: list = []
    try:
        for i, (member, offset, size) in enumerate(iter_members(data, name)):
            key = member_name(first + i)
            if member != key:
                raise DataError(f"{name}: member {i} is {member!r}, expected {key!r}")
            if size % DTYPES[dtype].itemsize:
                raise DataError(f"{name}: member {member!r} has {size} bytes, not a multiple of "
                                f"{dtype}")
            docs.append(np.frombuffer(data, dtype=DTYPES[dtype], count=size // DTYPES[dtype].itemsize,
                                      offset=offset))
    except DataError as e:
        where = (f"sample {member_name(first + len(docs))} (document {len(docs) + 1} of "
                 f"{s['documents']})")
        problems.append(f"unreadable at {where}: {str(e).removeprefix(name + ': ')}")
        return problems
    if len(docs) != s["documents"]:
        problems.append(f"{len(docs)} samples, manifest says {s['documents']}")
    tokens = sum(len(d) for d in docs)
    if tokens != s["tokens"]:
        problems.append(f"{tokens} tokens, manifest says {s['tokens']}")
    bad = next((i for i, d in enumerate(docs) if len(d) and int(d.max()) >= vocab), None)
    if bad is not None:
        problems.append(f"token id {int(docs[bad].max())} in sample {member_name(first + bad)} is "
                        f"outside the vocabulary ({vocab})")
    if not hash_ok and len(problems) == 1 and s["documents"]:
        problems.append(f"payload damage in one of samples {member_name(first)}…"
                        f"{member_name(first + s['documents'] - 1)} (tar has no per-sample "
                        "checksum; only the shard's sha256 differs)")
    return problems
