"""Checkpoints in megatron-core's distributed format (``dist_checkpointing``, torch_dist backend).

Every rank writes its own shards; the metadata records global shapes and offsets, so a checkpoint
written under one TP/PP/EP/DP layout loads under another (megatron-core reshards on load).

Layout of a run's checkpoint folder::

    checkpoints/
      step_00000100/        one complete checkpoint (megatron dist-checkpoint + hymoe.json)
      latest                text file: the folder name of the newest complete checkpoint

A checkpoint is written to ``step_XXXXXXXX.tmp`` and renamed when every rank has finished, and
``latest`` is replaced after that, so a crash mid-save never leaves a half checkpoint that
``train.resume=auto`` would pick. ``hymoe.json`` records the size and sha256 of every file of the
checkpoint; loading verifies them, so a corrupted or truncated file is an error naming the file, not
a silently different model.

With ``checkpoint.async_save`` the same save runs with its tensor writes in a background process
(``hymoe.train.async_save``); the rename and ``latest`` still come only after every rank's files
are written and checksummed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from hymoe.train import faults

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _model_sharded_state_dict(chunks) -> dict:
    if len(chunks) == 1:
        return _unwrap(chunks[0]).sharded_state_dict()
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _load_model_state(chunks, state: dict) -> None:
    if len(chunks) == 1:
        _unwrap(chunks[0]).load_state_dict(state, strict=True)
    else:
        for i, c in enumerate(chunks):
            _unwrap(c).load_state_dict(state[f"model{i}"], strict=True)


def save_model_weights(chunks, directory: str | os.PathLike) -> None:
    """Model weights only (e.g. an initialisation shared by several layouts)."""
    directory = str(directory)
    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save({"model": _model_sharded_state_dict(chunks)}, directory)
    dist.barrier()


def load_model_weights(chunks, directory: str | os.PathLike) -> None:
    directory = str(directory)
    if not Path(directory, "metadata.json").exists():
        raise CheckpointError(f"{directory}: not a megatron dist-checkpoint (no metadata.json)")
    with torch.no_grad():
        state = dist_checkpointing.load({"model": _model_sharded_state_dict(chunks)}, directory)
    _load_model_state(chunks, state["model"])


def load_model_weights_from_hf(chunks, hf_dir: str | os.PathLike, model_cfg) -> None:
    """Weights of a Hugging Face ``nemotron_h`` folder into this rank's model chunks, any layout:
    each rank reads only its shards from the safetensors files (``hymoe.model.hf_slices``)."""
    from hymoe.model.hf_slices import load_hf_weights

    state = load_hf_weights(_model_sharded_state_dict(chunks), hf_dir, model_cfg)
    per_chunk = [state] if len(chunks) == 1 else [state[f"model{i}"] for i in range(len(chunks))]
    for chunk, part in zip(chunks, per_chunk):
        missing, unexpected = _unwrap(chunk).load_state_dict(part, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointError(f"{hf_dir}: state mismatch reading the HF folder: missing "
                                  f"{missing[:4]}, unexpected {unexpected[:4]}")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


_STEP_DIR = re.compile(r"^step_(\d{8})$")


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, newest first (``*.tmp`` leftovers are not complete)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "hymoe.json").exists()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_SUMS = "sha256_rank{:05d}.json"


def _file_table(directory: Path) -> dict:
    """{file: {bytes, sha256}} of every file of a checkpoint folder. The shards' entries come
    from the ``sha256_rank*.json`` files their writers left (read, then deleted); the rest —
    small metadata and RNG files — are hashed here."""
    known = {}
    for sums in directory.glob(_SUMS.replace("{:05d}", "*")):
        known.update(json.loads(sums.read_text()))
        sums.unlink()
    table = {}
    for p in sorted(directory.rglob("*")):
        rel = str(p.relative_to(directory))
        if p.is_file() and p.name != "hymoe.json":
            hit = known.get(rel)
            table[rel] = hit if hit and hit["bytes"] == p.stat().st_size else {
                "bytes": p.stat().st_size, "sha256": _sha256(p)}
    return table


def _write_and_checksum(write, sums_file: Path, rank: int, write_buckets, results_queue) -> None:
    """megatron's shard writer (``write``, an AsyncRequest's async_fn; same arguments), then the
    sha256 of every file it wrote, into ``sums_file`` — hashed by the writer, in the background
    when saving asynchronously, and by every rank for its own shards instead of by rank 0 for
    all of them."""
    write(rank, write_buckets, results_queue)
    table = {}
    for bucket in write_buckets:
        f = Path(bucket[0])  # (file name, storage key, data)
        if f.exists():  # a failed write is reported by megatron's finalization
            table[f.name] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    tmp = sums_file.with_suffix(".part")
    tmp.write_text(json.dumps(table))
    os.replace(tmp, sums_file)


def verify(path: str | os.PathLike) -> list[str]:
    """Problems with a checkpoint folder (one line each, naming the file); [] when intact."""
    path = Path(path)
    meta_file = path / "hymoe.json"
    if not meta_file.exists():
        return [f"{path}: incomplete checkpoint (no hymoe.json)"]
    try:
        files = json.loads(meta_file.read_text()).get("files")
    except json.JSONDecodeError as e:
        return [f"{meta_file}: unreadable ({e.msg})"]
    if files is None:
        return [f"{meta_file}: no file table (written by an older hymoe?)"]
    problems = []
    for rel, want in files.items():
        f = path / rel
        if not f.exists():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != want["bytes"]:
            problems.append(f"{f}: {f.stat().st_size} bytes, expected {want['bytes']} (truncated?)")
        elif _sha256(f) != want["sha256"]:
            problems.append(f"{f}: sha256 mismatch (corrupted)")
    return problems


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root`` per the ``latest`` marker, or None."""
    marker = Path(root, "latest")
    if not marker.exists():
        return None
    path = Path(root, marker.read_text().strip())
    if not Path(path, "hymoe.json").exists():
        raise CheckpointError(
            f"{marker} points at {path.name}, which is not a complete checkpoint; "
            f"remove the marker to start fresh or point it at an earlier step_* folder"
        )
    return path


def save(root, step: int, chunks, optimizer, scheduler, extra: dict, keep_last: int = 0,
         keep_every: int = 0, async_queue=None) -> Path:
    """Save model, optimizer, scheduler and ``extra`` (JSON: step, tokens, data state, config).

    With ``async_queue`` (an :class:`hymoe.train.async_save.AsyncCheckpointQueue`) the tensor
    shards are written by a background process: this returns once everything of step ``step``
    is captured (tensors snapshotted, RNG files, metadata), and the checkpoint becomes complete —
    verified, renamed, named by ``latest`` — when the queue finalizes it. Every rank calls this."""
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd = _model_sharded_state_dict(chunks)
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
        )
    # common.pt, sharded objects and the write plan are done here; the tensor writes are in the
    # returned request (megatron's AsyncRequest), .metadata and metadata.json in its finalize
    # functions. A synchronous save runs the same request in this process (as megatron does).
    request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
    if request.async_fn is not None:  # None: this rank has no shard to write
        request = request._replace(async_fn=functools.partial(
            _write_and_checksum, request.async_fn, tmp / _SUMS.format(rank)))
    torch.save(_rng_state(chunks), tmp / f"rng_rank{rank:05d}.pt")
    # Everything step-dependent is taken now, as a copy: the finalization may run steps later.
    meta = dict(extra, step=step, format_version=FORMAT_VERSION, world_size=dist.get_world_size())
    if scheduler is not None:
        meta["scheduler"] = scheduler.state_dict()
    meta = json.loads(json.dumps(meta, default=str))
    request.add_finalize_fn(
        functools.partial(_finish, root, tmp, final, meta, keep_last, keep_every))
    if async_queue is None:
        request.execute_sync()
    else:
        async_queue.schedule(request, final, step)
    return final


def _finish(root: Path, tmp: Path, final: Path, meta: dict, keep_last: int,
            keep_every: int) -> None:
    """Every rank's files are written: checksum them, write hymoe.json, rename the folder to its
    final name, point ``latest`` at it, prune old ones. Called on every rank."""
    dist.barrier()
    if faults.due("kill_in_save", meta["step"]):
        faults.kill_self()
    if dist.get_rank() == 0:
        meta = dict(meta, files=_file_table(tmp))
        (tmp / "hymoe.json").write_text(json.dumps(meta, indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker_tmp = root / "latest.tmp"
        marker_tmp.write_text(final.name)
        os.replace(marker_tmp, root / "latest")
        _prune(root, keep_last, keep_every)
    dist.barrier()


def _rng_state(chunks) -> dict:
    """This rank's random streams: Python's, numpy's, torch's CPU (and CUDA) generators,
    megatron's model-parallel CUDA RNG tracker, and the stochastic-rounding stream of each model
    chunk's quantized GEMMs (so a resumed NVFP4 run repeats the same draws)."""
    import random

    import numpy as np

    state = {"python_rng": random.getstate(), "numpy_rng": np.random.get_state(),
             "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        state["cuda_rng"] = torch.cuda.get_rng_state()
        state["rng_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    srs = [getattr(_unwrap(c), "hymoe_sr_rng", None) for c in chunks]
    if any(sr is not None for sr in srs):
        state["sr_rngs"] = [sr.state_dict() if sr is not None else None for sr in srs]
    return state


def _set_rng_state(chunks, state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch_rng"])
    if "python_rng" in state:
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
    if torch.cuda.is_available() and "cuda_rng" in state:
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda_rng"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker"])
    # "sr_rng" (chunk 0 only) is what checkpoints written before per-chunk streams hold.
    srs = state.get("sr_rngs", [state["sr_rng"]] if "sr_rng" in state else [])
    for chunk, sr_state in zip(chunks, srs):
        sr = getattr(_unwrap(chunk), "hymoe_sr_rng", None)
        if sr is not None and sr_state is not None:
            sr.load_state_dict(sr_state)


def _prune(root: Path, keep_last: int, keep_every: int) -> None:
    """Delete complete checkpoints beyond the newest ``keep_last`` (0: keep all), except every
    ``keep_every``-th step; the one ``latest`` names is always kept."""
    if keep_last <= 0:
        return
    for i, path in enumerate(complete_checkpoints(root)):
        step = int(_STEP_DIR.match(path.name).group(1))
        if i < keep_last or (keep_every and step % keep_every == 0):
            continue
        shutil.rmtree(path, ignore_errors=True)


def _init_distributed_optimizer_state(optimizer) -> None:
    """Adam's state tensors exist only after a first step. megatron-core creates them before a
    load for its plain optimizers but not for the distributed one, whose sharded state dict then
    has nothing to load into; create them (zeros) here."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and opt.init_state_fn and not opt.optimizer.state:
            opt.init_state_fn(opt.optimizer, opt.config)


# Scheduler state → the recipe keys that set it (hymoe.train.optim.build_scheduler).
_SCHEDULE_FIELDS = {
    "max_lr": "optim.lr", "min_lr": "optim.min_lr", "lr_warmup_steps": "optim.warmup_steps",
    "lr_decay_steps": "train.steps / optim.schedule", "lr_decay_style": "optim.schedule",
    "start_wd": "optim.weight_decay", "end_wd": "optim.weight_decay",
}


def _check_schedule(recipe: dict, saved: dict, path: Path) -> None:
    """Refuse to resume on a schedule other than the checkpoint's without saying so: megatron
    would silently keep the checkpoint's (its default) and the recipe's change would be lost."""
    diffs = [f"{_SCHEDULE_FIELDS[k]} ({k} {saved[k]} → {recipe[k]})" for k in _SCHEDULE_FIELDS
             if k in saved and saved[k] != recipe.get(k)]
    if diffs:
        from hymoe.train.config import ConfigError  # a recipe problem, not a damaged checkpoint

        raise ConfigError(
            f"{path.name}: the recipe's LR schedule differs from the checkpoint's: "
            + "; ".join(diffs) + ". Restore those values to resume as it was, or set "
            "optim.override_schedule=true to continue from its step on the recipe's schedule"
        )


def load(path, chunks, optimizer, scheduler, verify_files: bool = True) -> dict:
    """Load everything saved by :func:`save` into the given (already built) objects; return meta.
    With ``verify_files`` every file is checked against the checksums first (rank 0 reads them
    all; every rank learns the verdict)."""
    path = Path(path)
    meta_file = path / "hymoe.json"
    if not meta_file.exists():
        raise CheckpointError(f"{path}: incomplete checkpoint (no hymoe.json)")
    if verify_files:
        verdict = [verify(path) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0]:
            raise CheckpointError(
                f"{verdict[0][0]}" + (f" (+{len(verdict[0]) - 1} more)" if len(verdict[0]) > 1 else "")
                + f"; checkpoint {path.name} is damaged: set checkpoint.fallback=true to resume from "
                "the previous one, or remove it"
            )
    meta = json.loads(meta_file.read_text())
    override = scheduler is not None and scheduler.override_opt_param_scheduler
    if scheduler is not None and "scheduler" in meta and not override:
        _check_schedule(scheduler.state_dict(), meta["scheduler"], path)
    model_sd = _model_sharded_state_dict(chunks)
    state = {"model": model_sd}
    if optimizer is not None:
        _init_distributed_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
        )
    with torch.no_grad():
        loaded = dist_checkpointing.load(state, str(path))
    _load_model_state(chunks, loaded["model"])
    if optimizer is not None:
        # megatron's param groups carry the schedule's hyperparameters (max_lr, min_lr, weight
        # decay) and loading replaces them with the checkpoint's: with an overridden schedule,
        # the recipe's stay, and only the state (moments, step counts) is the checkpoint's.
        recipe_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(loaded["optimizer"])
        if override:
            for g, mine in zip(optimizer.param_groups, recipe_groups, strict=True):
                g.update(mine)
    if scheduler is not None and "scheduler" in meta:
        scheduler.load_state_dict(meta["scheduler"])  # with override: the step count only
        if override:
            scheduler.step(increment=0)  # the recipe's LR at that step, into the param groups
    rng_file = path / f"rng_rank{dist.get_rank():05d}.pt"
    if rng_file.exists() and meta.get("world_size") == dist.get_world_size():
        _set_rng_state(chunks, torch.load(rng_file, weights_only=False))
    return meta
