"""``hymoe convert``: Hugging Face ``nemotron_h`` ↔ hymoe checkpoints.

to-hf: a training checkpoint (any TP/PP/EP layout; resharded onto one process) → config.json +
safetensors that transformers' ``NemotronHForCausalLM`` loads. from-hf: an HF folder → a
model-weights dist-checkpoint plus ``model.yaml``; train from it with
``checkpoint.init_weights=OUT model=... `` (the model keys in model.yaml).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from hymoe.model.config import ModelConfig
from hymoe.train import checkpoint as ckpt
from hymoe.train.stage import checkpoint_meta, find_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def to_hf(checkpoint: str, out: str, dtype: str = "bf16", progress: bool = False) -> Path:
    """Layer by layer (``hymoe.model.hf.checkpoint_to_hf``); ``progress``: a bar of layers read,
    on stderr."""
    from hymoe.model.hf import checkpoint_to_hf

    path = find_checkpoint(checkpoint)
    meta = checkpoint_meta(path)
    cfg = ModelConfig(**meta["model"])
    bar = []

    def on_load(done: int, total: int):
        if not bar:
            from hymoe.data.progress import count_progress

            bar.extend(count_progress(True, total, "converting layers"))
            bar[0].start()
        bar[0].update(bar[1], completed=done)

    try:
        return checkpoint_to_hf(path, cfg, meta["vocab_size"], out, dtype=DTYPES[dtype],
                                on_load=on_load if progress else None)
    finally:
        if bar:
            bar[0].stop()


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
