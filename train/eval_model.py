"""A trained checkpoint as one in-process model for evaluation, and its tokenizer.

Any checkpoint ``hymoe train`` wrote — under any TP/PP/EP layout — loads here onto one process
(megatron's dist-checkpointing reshards it), with the model config saved in its ``hymoe.json``.
The output layer and loss run in chunks (``model.loss_chunk_tokens``, 4096 unless the checkpoint's
config sets it), so a long sequence's logits are never held whole.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from hymoe.train import checkpoint as ckpt
from hymoe.train.stage import checkpoint_meta, find_checkpoint, run_config_path

EVAL_LOSS_CHUNK_TOKENS = 4096


def parse_length(text: str) -> int:
    """'4k' → 4096, '1M' → 1048576, '3000' → 3000 (k and M are powers of two, as context lengths)."""
    t = text.strip()
    scale = {"k": 1024, "K": 1024, "m": 1 << 20, "M": 1 << 20}.get(t[-1:], 1)
    try:
        value = int(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise ValueError(f"{text!r} is not a length (e.g. 4096, 4k, 1M)") from None
    if value < 1:
        raise ValueError(f"{text!r}: a length must be positive")
    return value


def load_model(checkpoint: str | Path, device: str | None = None):
    """(model in eval mode, meta, checkpoint path). ``checkpoint``: anything ``find_checkpoint``
    accepts — a training checkpoint (meta: its hymoe.json), ``hymoe convert from-hf`` output
    (meta from its model.yaml; no step, and no run to find the tokenizer in: pass it) or a Hugging
    Face folder (its config.json and tokenizer.json)."""
    from hymoe.model.config import ModelConfig
    from hymoe.model.hf import build_single_process

    path = find_checkpoint(checkpoint)
    meta = checkpoint_meta(path)
    cfg = ModelConfig(**meta["model"])
    cfg.loss_chunk_tokens = cfg.loss_chunk_tokens or EVAL_LOSS_CHUNK_TOKENS
    model = build_single_process(cfg, meta["vocab_size"], initialize=False)
    if meta.get("hf"):  # a Hugging Face folder, read in place
        ckpt.load_model_weights_from_hf([model], path, cfg)
    else:
        ckpt.load_model_weights([model], path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    for mixer in model._mamba_mixers():
        mixer.seq_idx = None
    return model, meta, path


def tokenizer_path(checkpoint: Path, override: str | None = None) -> Path:
    """The tokenizer.json the checkpoint's run trained with: ``override``, else one beside the
    weights (a Hugging Face folder ships its own), else the one in the run's ``data.path`` (its
    first dataset for a blend) per the run's config.yaml."""
    from omegaconf import OmegaConf

    from hymoe.data.tokenizer import tokenizer_file

    if override:
        return tokenizer_file(override)
    if tokenizer_file(checkpoint).is_file():
        return tokenizer_file(checkpoint)
    cfg_file = run_config_path(checkpoint)
    if cfg_file is not None:
        data = OmegaConf.to_container(OmegaConf.load(cfg_file)).get("data", {})
        base = Path(data.get("path", "."))
        candidates = [base] + [p if p.is_absolute() else base / p for p in
                               (Path(d["path"]) for d in (data.get("datasets") or {}).values())]
        for c in candidates:
            if tokenizer_file(c).is_file():
                return tokenizer_file(c)
    raise FileNotFoundError(
        f"no tokenizer found for {checkpoint} (looked in its run's data.path); pass --tokenizer "
        "PATH (the tokenizer.json of the data it was trained on)"
    )


@contextmanager
def logits_of_last(model, n: int):
    """Within the block, ``model(tokens, None, None)`` returns logits [b, n, vocab] of the last
    ``n`` positions only: the output layer sees only their hidden states."""
    def keep_last(module, args, kwargs):
        return (args[0][-n:],) + tuple(args[1:]), kwargs

    handle = model.output_layer.register_forward_pre_hook(keep_last, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def device_of(model) -> torch.device:
    return next(model.parameters()).device
