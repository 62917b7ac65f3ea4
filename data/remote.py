"""Datasets on object stores and web servers: fetched shard by shard into a local mirror.

A dataset location is a local directory, an ``http(s)://`` URL of one, or a ``pipe:`` command
that writes one of its files to stdout, with ``{}`` standing for the file name (webdataset's
convention, so anything a shell can read works — ``pipe:aws s3 cp s3://bucket/web/{} -``,
``pipe:gsutil cat gs://bucket/web/{}``).

The manifest is fetched when the dataset is opened; a shard when a stream first needs it. Each
file lands in a mirror directory (``$HYMOE_DATA_CACHE``, default ``~/.cache/hymoe/remote``, one
folder per location) under a temporary name and is renamed into place only when complete, so the
reader memory-maps and checks it exactly like a local shard: a shard whose sha256 differs from the
manifest is an error naming the location and the shard, never read. Processes that share the
mirror (ranks, loader workers) reuse what another has fetched.

With ``$HYMOE_DATA_CACHE_GB`` set, a location's mirror keeps at most that many GB of shards: after
each fetch the least recently opened shards are deleted (the reader marks a shard's access time
when it opens one). A process that has a deleted shard open keeps reading it (its mapping holds
the file until closed); one that needs it again fetches it again.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from hymoe.data.errors import DataError

_TIMEOUT_S = 300


def is_remote(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(("http://", "https://", "pipe:"))


def join(location: str, name: str) -> str:
    """The location of file ``name`` of a remote dataset (a URL, or the command for it)."""
    if location.startswith("pipe:"):
        if "{}" not in location:
            raise DataError(f"{location!r}: a pipe: dataset location needs '{{}}' where the file "
                            "name goes, e.g. 'pipe:aws s3 cp s3://bucket/data/{} -'")
        return location.replace("{}", name)
    return location.rstrip("/") + "/" + name


def mirror_dir(location: str) -> Path:
    root = Path(os.environ.get("HYMOE_DATA_CACHE", Path.home() / ".cache" / "hymoe" / "remote"))
    return root / hashlib.sha256(location.encode()).hexdigest()[:24]


def cache_limit() -> int | None:
    """``$HYMOE_DATA_CACHE_GB`` in bytes (None: unset, no limit)."""
    value = os.environ.get("HYMOE_DATA_CACHE_GB", "").strip()
    if not value:
        return None
    try:
        gb = float(value)
    except ValueError:
        gb = float("nan")
    if not gb > 0:
        raise DataError(f"HYMOE_DATA_CACHE_GB={value!r}: give the most GB of shards a remote "
                        "dataset's local mirror may keep (e.g. 500), or unset it for no limit")
    return int(gb * 1e9)


def mark_used(path: Path) -> None:
    """Make `path` the most recently used shard of its mirror (its access time; the modification
    time, part of the reader's checked stamp, stays)."""
    try:
        st = os.stat(path)
        os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))
    except OSError:  # deleted meanwhile by another process's trim: it will be fetched again
        pass


def trim(directory: Path, limit: int, keep: Path) -> None:
    """Delete the least recently used shards of a mirror folder until its shards take at most
    `limit` bytes; `keep` (the shard just fetched) stays whatever its size."""
    shards = []
    for p in directory.glob("*.tar"):
        try:
            st = p.stat()
        except OSError:
            continue
        shards.append((st.st_atime_ns, st.st_size, p))
    total = sum(size for _, size, _ in shards)
    for _, size, p in sorted(shards):
        if total <= limit:
            break
        if p != keep:
            p.unlink(missing_ok=True)
            total -= size


def fetch(location: str, name: str, refresh: bool = False) -> Path:
    """File ``name`` of the remote dataset at ``location``, in its local mirror."""
    out = mirror_dir(location) / name
    if out.is_file() and not refresh:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{name}.{os.getpid()}.tmp")
    source = join(location, name)
    try:
        with open(tmp, "wb") as f:
            if source.startswith("pipe:"):
                _run_pipe(source[len("pipe:"):], f)
            else:
                _download(source, f)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    limit = cache_limit()
    if limit is not None:
        trim(out.parent, limit, keep=out)
    return out


def _download(url: str, f) -> None:
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as r:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"{url}: could not fetch ({e}); check the URL and the network") from None


def _run_pipe(command: str, f) -> None:
    proc = subprocess.run(shlex.split(command), stdout=f, stderr=subprocess.PIPE,
                          timeout=_TIMEOUT_S, check=False)
    if proc.returncode:
        err = proc.stderr.decode(errors="replace").strip()[-500:]
        raise DataError(f"pipe:{command}: exited with {proc.returncode}: {err}")
