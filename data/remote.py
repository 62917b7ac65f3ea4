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
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
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
