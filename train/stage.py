"""A training stage that starts from another run's checkpoint (``checkpoint.init_weights``): the
long-context stage after pretraining, or continued pretraining from converted Hugging Face weights.

A stage keeps the architecture and may change everything else: sequence length, data blend and
long/short mix, LR schedule, layout, batch. What it takes from the checkpoint:
- the model weights, always (resharded onto this run's layout by megatron's dist-checkpointing);
- the optimizer state (Adam moments) with ``checkpoint.init_optimizer`` — as Megatron-LM's
  ``--finetune`` without ``--no-load-optim``;
- never the LR schedule, step count, data position or token count: a stage has its own schedule
  and blend, and its ``train.steps`` and ``tokens`` count its own steps from 0.
Once the stage has written its own checkpoint, a restart resumes that one (``train.resume``) and
``init_weights`` is ignored.

``hymoe train`` prints what it loaded (path, step, tokens) and every config key that differs
from the ``config.yaml`` of the run that wrote the checkpoint, and saves both as
``<run.dir>/stage.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from omegaconf import OmegaConf

from hymoe.train import checkpoint as ckpt

# Differ for every run; not worth a line in the report.
_NOISE = ("run.dir", "checkpoint.dir")
# Shapes of the weights: a stage cannot change them (megatron would fail on a shape mismatch
# deep inside dist-checkpointing; this says which key).
ARCHITECTURE_KEYS = (
    "pattern", "hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
    "ffn_hidden_size", "mamba_num_heads", "mamba_head_dim", "mamba_state_dim", "mamba_num_groups",
    "num_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_latent_size",
    "untie_embeddings_and_output_weights", "mtp_shared_layer",
)
UNSET = "(unset)"


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint a path names: a ``step_*`` folder; a checkpoints folder or a run folder (its
    ``latest``); a folder of runs (the newest, by name, that has a checkpoint); or a weights-only
    dist-checkpoint (``hymoe convert from-hf`` output); or a Hugging Face ``nemotron_h`` folder."""
    p = Path(path)
    if (p / "hymoe.json").exists() or is_hf_folder(p):
        return p
    for root in (p, p / "checkpoints"):
        latest = ckpt.latest_checkpoint(root)
        if latest is not None:
            return latest
    if (p / "metadata.json").exists():
        return p
    if p.is_dir():
        runs = sorted((d for d in p.iterdir() if (d / "checkpoints" / "latest").exists()),
                      key=lambda d: d.name, reverse=True)
        if runs:
            return ckpt.latest_checkpoint(runs[0] / "checkpoints")
    raise ckpt.CheckpointError(
        f"{p}: no checkpoint there (a step_* folder, a checkpoints or run folder with a 'latest' "
        "marker, a folder of runs, `hymoe convert from-hf` output, or a Hugging Face nemotron_h "
        "folder); train the previous stage first or set checkpoint.init_weights"
    )


def checkpoint_meta(path: Path) -> dict:
    """What a checkpoint (``find_checkpoint``'s answer) says of itself: ``step``, ``vocab_size``
    and ``model`` (ModelConfig's fields). A training checkpoint's file table is checked first (its
    hymoe.json); ``hymoe convert from-hf`` output has its model.yaml and no step, a Hugging Face
    folder its config.json (``"hf": True``)."""
    from hymoe.model.config import ModelConfig

    if is_hf_folder(path):
        meta = hf_meta(path)
    elif (path / "hymoe.json").exists():
        problems = ckpt.verify(path)
        if problems:
            raise ckpt.CheckpointError(f"{problems[0]}; checkpoint {path} is damaged")
        meta = json.loads((path / "hymoe.json").read_text())
        if "model" not in meta or "vocab_size" not in meta:
            raise ckpt.CheckpointError(f"{path}/hymoe.json has no model config (saved by an older hymoe)")
    elif (path / "model.yaml").exists():  # `hymoe convert from-hf` output, e.g. released weights
        fields = OmegaConf.to_container(OmegaConf.load(path / "model.yaml"))
        meta = {"step": None, "model": fields, "vocab_size": fields["vocab_size"]}
    else:
        raise ckpt.CheckpointError(
            f"{path}: no model config (neither hymoe.json nor model.yaml); use a training "
            "checkpoint or `hymoe convert from-hf` output"
        )
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return {**meta, "model": {k: v for k, v in meta["model"].items() if k in known}}


def run_config_path(checkpoint: Path) -> Path | None:
    """The ``config.yaml`` of the run that wrote ``checkpoint`` (``<run>/checkpoints/step_*``)."""
    for d in (checkpoint.parent.parent, checkpoint.parent, checkpoint):
        if (d / "config.yaml").exists():
            return d / "config.yaml"
    return None


def flatten(tree, prefix: str = "") -> dict:
    """Nested dicts → {"a.b.c": leaf}; lists stay whole leaves."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):  # an empty one adds no key: {} → {x: 1} reads "x: (unset) → 1"
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old, new) for every leaf that differs, in the order of ``new`` then keys only in
    ``old``; a missing side is ``UNSET``."""
    a, b = flatten(old), flatten(new)
    keys = list(b) + [k for k in a if k not in b]
    return [(k, a.get(k, UNSET), b.get(k, UNSET)) for k in keys
            if k not in _NOISE and a.get(k, UNSET) != b.get(k, UNSET)]


def _check_architecture(meta: dict, cfg, vocab_size: int, where: Path) -> None:
    saved = meta.get("model") or {}
    mine = dataclasses.asdict(cfg.model)
    for key in ARCHITECTURE_KEYS:
        if key in saved and saved[key] != mine[key]:
            raise ckpt.CheckpointError(
                f"model.{key}: {where} holds a model with {key}={saved[key]!r}, this run has "
                f"{mine[key]!r}; a stage keeps the architecture (set model.{key}={saved[key]!r})"
            )
    if "vocab_size" in meta and meta["vocab_size"] != vocab_size:
        raise ckpt.CheckpointError(
            f"model.vocab_size: {where} has a (padded) vocabulary of {meta['vocab_size']}, this run "
            f"{vocab_size}; use the same tokenizer (data) and model.vocab_size as the checkpoint"
        )


def _verify_on_rank0(path: Path) -> None:
    """Checksums of every file, read once (rank 0), the verdict shared with every rank."""
    import torch.distributed as dist

    verdict = [ckpt.verify(path) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise ckpt.CheckpointError(f"{verdict[0][0]}; checkpoint {path} is damaged")


def is_hf_folder(path: str | Path) -> bool:
    """A Hugging Face ``nemotron_h`` folder (config.json and safetensors), e.g. released weights."""
    p = Path(path)
    return (p / "config.json").is_file() and any(
        (p / f).exists() for f in ("model.safetensors", "model.safetensors.index.json"))


def hf_meta(path: Path, mtp_depths: int | None = None) -> dict:
    """``checkpoint_meta`` of a Hugging Face folder, from its config.json (``mtp_depths``: those
    of a shared MTP block, see ``model_config_from_hf``)."""
    from hymoe.model.hf_config import HFConversionError, model_config_from_hf

    try:
        cfg, vocab = model_config_from_hf(json.loads((path / "config.json").read_text()),
                                          name=path.name, mtp_depths=mtp_depths)
    except HFConversionError as e:
        raise ckpt.CheckpointError(f"{path}/config.json: {e}") from None
    return {"step": None, "model": dataclasses.asdict(cfg), "vocab_size": vocab, "hf": True}


def _start_from_hf(trainer, path: Path) -> tuple[dict, dict, str]:
    """Load an HF folder's weights, each rank reading its shards; (meta, old config, against)."""
    from hymoe.model.hf_config import HFConversionError

    cfg, cc = trainer.cfg, trainer.cfg.checkpoint
    if cc.init_optimizer:
        raise ckpt.CheckpointError(
            f"checkpoint.init_optimizer: {path} is a Hugging Face folder, which holds no optimizer "
            "state; set checkpoint.init_optimizer=false")
    shared = len(cfg.model.mtp_depths) if cfg.model.mtp_shared_layer else None
    try:
        meta = hf_meta(path, shared)
    except ckpt.CheckpointError as e:
        raise ckpt.CheckpointError(f"checkpoint.init_weights: {e}") from None
    _check_architecture(meta, cfg, trainer.vocab_size, path)
    try:
        ckpt.load_model_weights_from_hf(trainer.chunks, path, cfg.model)
    except HFConversionError as e:
        raise ckpt.CheckpointError(f"checkpoint.init_weights: {e}") from None
    return {}, {"model": meta["model"]}, f"{path}/config.json (model keys)"


def start_from_checkpoint(trainer) -> dict:
    """Load ``checkpoint.init_weights`` (and, with ``init_optimizer``, the optimizer state) into
    the trainer's model; print and save what was loaded and what the stage changes. A Hugging
    Face folder is read directly, each rank reading only its shards."""
    cfg, cc = trainer.cfg, trainer.cfg.checkpoint
    if is_hf_folder(cc.init_weights):
        meta, old, against = _start_from_hf(trainer, Path(cc.init_weights))
        new = {"model": OmegaConf.to_container(OmegaConf.structured(cfg))["model"]}
        return _report(trainer, Path(cc.init_weights), meta, old, new, against)
    path = find_checkpoint(cc.init_weights)
    meta = json.loads((path / "hymoe.json").read_text()) if (path / "hymoe.json").exists() else {}
    _check_architecture(meta, cfg, trainer.vocab_size, path)
    if cc.init_optimizer:
        if not meta:
            raise ckpt.CheckpointError(
                f"checkpoint.init_optimizer: {path} holds model weights only (no hymoe.json); "
                "set checkpoint.init_optimizer=false"
            )
        # megatron's param groups carry their hyperparameters (max_lr, min_lr, weight decay,
        # betas) and loading the optimizer replaces them with the checkpoint's: put this stage's
        # back, keeping only the state (Adam moments and step counts).
        groups = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups]
        ckpt.load(path, trainer.chunks, trainer.optimizer, None, cc.verify)
        for g, mine in zip(trainer.optimizer.param_groups, groups, strict=True):
            g.update(mine)
        trainer.scheduler.step(increment=0)  # and the LR of this stage's schedule at step 0
    else:
        if meta and cc.verify:
            _verify_on_rank0(path)
        ckpt.load_model_weights(trainer.chunks, path)
    new = OmegaConf.to_container(OmegaConf.structured(cfg))
    old_file = run_config_path(path)
    if old_file is not None:
        old = OmegaConf.to_container(OmegaConf.load(old_file))
        against = str(old_file)
    elif (path / "model.yaml").exists():  # `hymoe convert from-hf` output: its model keys
        old = {"model": OmegaConf.to_container(OmegaConf.load(path / "model.yaml"))}
        new = {"model": new["model"]}
        against = str(path / "model.yaml")
    else:  # a checkpoint moved away from its run: the model keys of hymoe.json at least
        old = {"model": meta.get("model", {})}
        new = {"model": new["model"]}
        against = f"{path}/hymoe.json (model keys; no config.yaml found)"
    return _report(trainer, path, meta, old, new, against)


def _report(trainer, path: Path, meta: dict, old: dict, new: dict, against: str) -> dict:
    cc = trainer.cfg.checkpoint
    report = {
        "checkpoint": str(path), "step": meta.get("step"), "tokens": meta.get("tokens"),
        "recipe": meta.get("recipe"), "optimizer_state": bool(cc.init_optimizer),
        "against": against,
        "changed": [{"key": k, "old": o, "new": n} for k, o, n in config_diff(old, new)],
    }
    if trainer.is_logger:
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        (trainer.run_dir / "stage.json").write_text(json.dumps(report, indent=1, default=str))
        for line in format_report(report):
            trainer.console.print(line, markup=False)
    return report


def format_report(report: dict) -> list[str]:
    step, tokens = report["step"], report["tokens"]
    where = (f"step {step}, {tokens:,} tokens, recipe {report['recipe']}" if step is not None
             else "weights only: no step or token count")
    what = "model weights and optimizer state" if report["optimizer_state"] else "model weights"
    lines = [
        f"initialised the model weights from {report['checkpoint']} ({where})",
        f"loaded: {what}; LR schedule, step count, token count and data position start fresh",
        f"changed against {report['against']}:" if report["changed"] else
        f"nothing changed against {report['against']}",
    ]
    lines += [f"  {c['key']}: {_short(c['old'])} → {_short(c['new'])}" for c in report["changed"]]
    return lines


def _short(v) -> str:
    # YAML-like scalars (true, null), as a user types them in overrides.
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text if len(text) <= 120 else text[:117] + "..."
