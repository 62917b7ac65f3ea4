"""The shard format: plain (USTAR) tar files readable by webdataset, one sample per document.

Sample `k` (k = the document's index in the whole dataset, in prepare order) is one tar member
`f"{k:09d}.tokens"`, whose payload is the document's token ids as raw little-endian integers of the
manifest's `dtype` (uint16 or uint32), with no header and no EOD (the loader adds EOD).
The extension is `.tokens`, not `.npy`, on purpose: webdataset's default decoders would try to parse
`.npy` members as numpy files. Members carry mtime 0 and no owner, so the same documents always give
the same bytes and the same sha256 (this is what makes resume and `verify` exact).
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from hymoe.data.errors import DataError

MEMBER_SUFFIX = ".tokens"
_BLOCK = 512
_ZERO_BLOCK = b"\0" * _BLOCK
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def member_name(key: int) -> str:
    return f"{key:09d}{MEMBER_SUFFIX}"


def dtype_for_vocab(vocab_size: int) -> str:
    """Smallest token dtype for a vocabulary: uint16 up to 65535 ids, else uint32."""
    return "uint16" if vocab_size <= 65535 else "uint32"


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def map_file(path: Path) -> memoryview | bytes:
    """A file's bytes, memory-mapped read-only (the page cache, not the heap)."""
    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # empty file, or a file system without mmap
            return f.read()
    return memoryview(mm)


def sha256_file(path: Path) -> str:
    # file_digest reads into one reused 256 KiB buffer: fast sequential I/O, bounded memory.
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_shard(path: Path, first_key: int, docs: Sequence[np.ndarray], dtype: str) -> dict:
    """Write `docs` (1-D integer arrays) as a shard at `path`, atomically.

    The tar is written to `<path>.tmp` and renamed, so a crash never leaves a partial shard under
    its final name. Returns the manifest entry {name, documents, tokens, bytes, sha256}.
    """
    np_dtype = DTYPES[dtype]
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, doc in enumerate(docs):
            payload = np.ascontiguousarray(doc, dtype=np_dtype).tobytes()
            info = tarfile.TarInfo(member_name(first_key + i))
            info.size = len(payload)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(payload))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    entry = {
        "name": path.name,
        "documents": len(docs),
        "tokens": int(sum(len(d) for d in docs)),
        "bytes": tmp.stat().st_size,
        "sha256": sha256_file(tmp),
    }
    os.replace(tmp, path)
    return entry


def iter_members(data: bytes | memoryview, where: str) -> Iterator[tuple[str, int, int]]:
    """Parse a shard's tar bytes strictly, yielding (member name, payload offset, payload size).

    Unlike `tarfile`, which silently stops at a damaged header after the first, every header's
    checksum is checked and the archive must end with the end-of-archive marker; any damage raises
    `DataError` naming `where` (callers count the members yielded before it to name the sample).
    """
    view = memoryview(data)
    pos = 0
    while True:
        if pos + _BLOCK > len(view):
            raise DataError(f"{where}: truncated tar (no end-of-archive marker at byte {pos})")
        block = bytes(view[pos : pos + _BLOCK])
        if block == _ZERO_BLOCK:
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "strict")
        except tarfile.HeaderError as e:
            raise DataError(f"{where}: damaged tar header at byte {pos} ({e})") from None
        if not info.isreg():
            raise DataError(f"{where}: tar member {info.name!r} at byte {pos} is not a regular file")
        start = pos + _BLOCK
        if start + info.size > len(view):
            raise DataError(f"{where}: truncated tar (member {info.name!r} runs past the end)")
        yield info.name, start, info.size
        pos = start + -(-info.size // _BLOCK) * _BLOCK


def read_members(data: bytes | memoryview, where: str) -> list[tuple[str, int, int]]:
    """`iter_members` as a list: [(member name, payload offset, payload size)]."""
    return list(iter_members(data, where))


def member_spans(data: bytes | memoryview) -> tuple[np.ndarray, np.ndarray]:
    """(payload offsets, payload sizes) in bytes, int64, of a shard already checked by sha256.

    A fast path for the loader: once the bytes equal what `write_shard` wrote, header checksums
    and names cannot be wrong, so only the size fields are read (~10x faster than `iter_members`).
    """
    view = memoryview(data)
    starts, sizes = [], []
    pos, end = 0, len(view) - _BLOCK
    while pos <= end and view[pos] != 0:  # a member name never starts with NUL; the marker does
        size = int(bytes(view[pos + 124 : pos + 136]).strip(b"\0 ") or b"0", 8)
        starts.append(pos + _BLOCK)
        sizes.append(size)
        pos += _BLOCK + -(-size // _BLOCK) * _BLOCK
    return np.array(starts, dtype=np.int64), np.array(sizes, dtype=np.int64)


def decode_documents(
    data: bytes | memoryview, dtype: str, first_key: int, where: str
) -> list[np.ndarray]:
    """Token arrays (read-only views into `data`, dtype as stored) of a shard's documents, in order.

    Checks that members are named with consecutive keys from `first_key` and that each payload is a
    whole number of tokens.
    """
    np_dtype = DTYPES[dtype]
    docs = []
    for i, (name, offset, size) in enumerate(read_members(data, where)):
        if name != member_name(first_key + i):
            raise DataError(
                f"{where}: member {i} is {name!r}, expected {member_name(first_key + i)!r}"
            )
        if size % np_dtype.itemsize:
            raise DataError(f"{where}: member {name!r} has {size} bytes, not a multiple of {dtype}")
        docs.append(np.frombuffer(data, dtype=np_dtype, count=size // np_dtype.itemsize, offset=offset))
    return docs
