"""``hymoe convert``: Hugging Face ``nemotron_h`` ↔ hymoe checkpoints.

to-hf: a training checkpoint (any TP/PP/EP layout; resharded onto one process) → config.json +
safetensors that transformers' ``NemotronHForCausalLM`` loads. from-hf: an HF folder → a
model-weights dist-checkpoint plus ``model.yaml``; train from it with
``checkpoint.init_weights=OUT model=... `` (the model keys in model.yaml).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from hymoe.model.config import ModelConfig
from hymoe.train import checkpoint as ckpt

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _resolve_checkpoint(path: Path) -> Path:
    """A step_* folder, or a checkpoints folder (its ``latest``)."""
    if (path / "hymoe.json").exists():
        return path
    latest = ckpt.latest_checkpoint(path)
    if latest is None:
        raise ckpt.CheckpointError(f"{path}: neither a checkpoint nor a folder with a 'latest' marker")
    return latest


def to_hf(checkpoint: str, out: str, dtype: str = "bf16") -> Path:
    from hymoe.model.hf import checkpoint_to_hf

    path = _resolve_checkpoint(Path(checkpoint))
    problems = ckpt.verify(path)
    if problems:
        raise ckpt.CheckpointError(problems[0] + f"; {path.name} is damaged")
    meta = json.loads((path / "hymoe.json").read_text())
    if "model" not in meta or "vocab_size" not in meta:
        raise ckpt.CheckpointError(f"{path}/hymoe.json has no model config (saved by an older hymoe)")
    cfg = ModelConfig(**meta["model"])
    return checkpoint_to_hf(path, cfg, meta["vocab_size"], out, dtype=DTYPES[dtype])


def from_hf(hf_dir: str, out: str, mtp_depths: int | None = None) -> Path:
    """``mtp_depths``: how many depths a shared MTP block runs (``hymoe.model.hf.from_hf``); the
    number goes into ``model.yaml``'s pattern, which training reads."""
    from omegaconf import OmegaConf

    from hymoe.model.hf import build_single_process, load_hf, load_into

    cfg, vocab, state = load_hf(hf_dir, mtp_depths=mtp_depths)
    model = build_single_process(cfg, vocab, initialize=False)
    load_into(model, state)
    out_path = Path(out)
    ckpt.save_model_weights([model], out_path)
    fields = dataclasses.asdict(cfg)
    fields["vocab_size"] = vocab
    (out_path / "model.yaml").write_text(OmegaConf.to_yaml(fields))
    return out_path
