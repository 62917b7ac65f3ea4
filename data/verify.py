"""`hymoe data verify`: every shard of a prepared directory checked against its manifest.

Shards are checked in parallel threads (reading, downloading and sha256 release the GIL), each
through a memory map, so memory stays flat whatever the shard size. A shard whose size and sha256
match holds exactly the bytes `prepare` wrote, so only the manifest's counts are left to check;
any other shard is diagnosed sample by sample (`manifest.shard_problems`, as the loader does).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hymoe.data.errors import DataError
from hymoe.data.manifest import load_manifest, shard_problems
from hymoe.data.progress import byte_progress
from hymoe.data.remote import fetch, is_remote, mirror_dir
from hymoe.data.shards import map_file, sha256_bytes


def verify(path: str | Path, workers: int = 0, progress: bool = False) -> list[str]:
    """Check every shard of a prepared directory against its manifest; [] means all is well.

    For each shard: it exists, its size and sha256 match, and its sample and token counts match
    (a damaged shard is walked sample by sample to name where). Each problem is one line that
    starts with the shard's (or file's) name, in shard order. A remote dataset (hymoe.data.remote)
    has every file fetched afresh into its mirror and checked there. `workers` threads (0: one per
    CPU, at most 8) check shards at once; `progress` shows a bar of bytes checked on stderr.
    """
    remote = str(path) if is_remote(path) else None
    directory = mirror_dir(remote) if remote else Path(path)
    try:
        m = load_manifest(remote or directory)
    except DataError as e:
        return [str(e)]

    def refetch(name: str) -> str | None:
        if remote:
            try:
                fetch(remote, name, refresh=True)
            except DataError as e:
                return f"{name}: {e}"
        return None

    problems: list[str] = []
    tok = m["tokenizer"]
    if line := refetch(tok["file"]):
        problems.append(line)
    tok_file = directory / tok["file"]
    if not tok_file.is_file():
        problems.append(f"{tok['file']}: missing")
    elif sha256_bytes(tok_file.read_bytes()) != tok["fingerprint"]:
        problems.append(f"{tok['file']}: sha256 does not match tokenizer.fingerprint")

    def check(i: int) -> list[str]:
        name = m["shards"][i]["name"]
        for attempt in range(2):  # a fetched copy may be trimmed from the mirror before it is read
            if line := refetch(name):
                return [line]
            try:
                data = map_file(directory / name)
                break
            except FileNotFoundError:
                if not remote or attempt:
                    return [f"{name}: missing"]
        return [f"{name}: {line}" for line in shard_problems(data, m, i)]

    bar = byte_progress(progress, m["totals"]["bytes"], "verifying")
    threads = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads, thread_name_prefix="hymoe-verify") as pool:
        if bar:
            bar[0].start()
        try:
            for s, lines in zip(m["shards"], pool.map(check, range(len(m["shards"])))):
                problems.extend(lines)
                if bar:
                    bar[0].update(bar[1], advance=s["bytes"])
        finally:
            if bar:
                bar[0].stop()
    return problems
