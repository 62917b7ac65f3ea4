"""Read the logged history and config of a Weights & Biases run from its local files, without
network or account — for ``hymoe compare`` on runs logged with ``logging.wandb=offline`` (or
online: wandb keeps the same file locally).

A run folder (``wandb/offline-run-<time>-<id>/`` or ``wandb/run-<time>-<id>/``) holds
``run-<id>.wandb``: wandb's transaction log, a LevelDB-style log of protobuf ``Record`` messages.
wandb 0.31 ships the message classes (``wandb.proto.wandb_internal_pb2``) but no reader of the
file, so the framing is read here:

- a 7-byte file header: ``:W&B``, magic 0xBEE1 (little-endian uint16), version 0;
- 32 KiB blocks (the file header counts towards the first); a block's last < 7 bytes are zero
  padding;
- each chunk: crc32 (uint32, zlib's CRC-32 of the data seeded with the CRC-32 of the type byte),
  length (uint16), type (uint8: 1 full, 2 first, 3 middle, 4 last), then the data; a record
  larger than a block is split into first/middle…/last chunks.

A run killed mid-write leaves a torn last chunk: reading stops there, keeping what came before.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

_MAGIC = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_TYPE_CRC = {t: zlib.crc32(bytes([t])) for t in (_FULL, _FIRST, _MIDDLE, _LAST)}


class WandbReadError(ValueError):
    pass


def records(path: str | Path):
    """Yield the serialized ``Record`` messages (bytes) of a ``.wandb`` file, in order."""
    path = Path(path)
    data = path.read_bytes()
    if data[:_HEADER] != _MAGIC:
        raise WandbReadError(f"{path}: not a wandb transaction log (header {data[:_HEADER]!r})")
    pos, parts = _HEADER, []
    while True:
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:
            pos += left_in_block
        if pos + _HEADER > len(data):
            return
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        torn = kind not in _TYPE_CRC or len(chunk) < length
        if torn or zlib.crc32(chunk, _TYPE_CRC[kind]) != crc:
            return  # torn or zeroed tail of a run that did not finish writing
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            parts = [chunk]
        elif parts:
            parts.append(chunk)
            if kind == _LAST:
                yield b"".join(parts)
                parts = []


def _value(value_json: str):
    return json.loads(value_json)  # wandb writes NaN and Infinity as JSON extensions


def read_run(path: str | Path) -> tuple[list[dict], dict, str]:
    """(history rows, config, run name) of one wandb run folder or ``.wandb`` file.

    Rows are dicts of the logged keys plus ``_step``; nested keys are joined with ``/``. Config
    values are as logged (nested dicts stay nested)."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.wandb"))
    if not files:
        raise WandbReadError(f"{path}: no .wandb file (is it a wandb run folder?)")
    rows, config, name = [], {}, path.name
    for file in files:
        for raw in records(file):
            record = pb.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "history":
                rows.append({
                    "/".join(item.nested_key) if item.nested_key else item.key:
                        _value(item.value_json)
                    for item in record.history.item
                })
            elif kind == "run":
                name = record.run.display_name or record.run.run_id or name
                config.update({i.key: _value(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: _value(i.value_json) for i in record.config.update})
    config.pop("_wandb", None)  # wandb's own bookkeeping, not the run's
    return rows, config, name


def run_folders(path: str | Path) -> list[Path]:
    """The wandb run folders of ``path``: itself if it holds a ``.wandb`` file, else those under
    ``path/wandb/`` or ``path`` (``offline-run-*``, ``run-*``), oldest first (a resumed hymoe run
    has one per launch)."""
    path = Path(path)
    if path.is_file() or any(path.glob("*.wandb")):
        return [path]
    for root in (path / "wandb", path):
        found = sorted((p for p in root.glob("*run-*") if p.is_dir() and any(p.glob("*.wandb"))),
                       key=lambda p: p.name.split("run-", 1)[1])
        if found:
            return found
    return []
