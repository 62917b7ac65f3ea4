"""Hugging Face ``nemotron_h`` interop: the format of the released Nemotron 3 checkpoints, which
transformers' ``NemotronHForCausalLM`` reads (config.json + safetensors). This file holds the
weights and folders; config.json ↔ ``ModelConfig`` (and what is refused there) is hf_config.py.

    to_hf(model_or_state, path, model_cfg=None)   hymoe/megatron-core (TP=PP=EP=1) → HF folder
    load_hf(path) → (ModelConfig, vocab, state)    HF folder → megatron state dict (no model)
    from_hf(path) → model                          the same, built on CPU in this process
    checkpoint_to_hf(ckpt, model_cfg, vocab, out)  a dist-checkpoint of any TP/PP/EP layout → HF,
                                                   one layer in memory at a time

The weight mapping (docs/model.md has it as a table) is a renaming except for attention: megatron
stores ``linear_qkv`` grouped by KV head, ``[g0: q…q k v | g1: q…q k v | …]``; HF has separate
``q_proj``/``k_proj``/``v_proj``. The Mamba ``in_proj`` (z, x, B, C, dt) and ``conv1d`` (x, B, C)
layouts are the same on both sides. Experts are written one tensor per expert
(``experts.{k}.up_proj.weight``), as in the released checkpoints; the stacked in-memory form that
transformers builds on load (``experts.up_proj`` [E, I, in]) is read as well.

Multi-Token Prediction is written as the released Nemotron 3 Super checkpoint holds it (and as
Megatron-Bridge's nemotron_h bridge and vLLM's ``nemotron_h_mtp`` read it): each physical MTP block
of pattern ``*E`` is flattened into consecutive HF layers ``mtp.layers.{L·p + j}`` (L = 2), the
first carrying ``enorm``/``hnorm``/``eh_proj`` and the attention, the last the MoE/MLP and
``final_layernorm``. A shared-layer model writes its one block (``hf_config.mtp_blocks``).
transformers' ``NemotronHForCausalLM`` ignores ``mtp.*`` on load.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Optional

import torch

from hymoe.model.config import ModelConfig
from hymoe.model.hf_config import (
    HFConversionError,
    hf_config,
    model_config_from_hf,
    model_config_of,
    mtp_blocks,
)
from hymoe.model.pattern import ATTENTION, MAMBA, MLP, MOE

# Kept in fp32 whatever the export dtype (decay rates; the routing bias is fp32 in both).
_FP32_KEYS = ("A_log", "D", "dt_bias", "e_score_correction_bias")



# ----------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------
def _layer_names(symbol: str, cfg: ModelConfig) -> list[tuple[str, str]]:
    """(megatron suffix, HF suffix) pairs of one layer that are plain renames."""
    if symbol == MAMBA:
        return [("norm.weight", "norm.weight")] + [
            (f"mixer.{n}", f"mixer.{n}")
            for n in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "A_log", "D", "dt_bias",
                      "norm.weight", "out_proj.weight")
        ]
    if symbol == ATTENTION:
        return [("input_layernorm.weight", "norm.weight"),
                ("self_attention.linear_proj.weight", "mixer.o_proj.weight")]
    if symbol == MLP:
        return [("pre_mlp_layernorm.weight", "norm.weight"),
                ("mlp.linear_fc1.weight", "mixer.up_proj.weight"),
                ("mlp.linear_fc2.weight", "mixer.down_proj.weight")]
    names = [("pre_mlp_layernorm.weight", "norm.weight"),
             ("mlp.router.weight", "mixer.gate.weight"),
             ("mlp.router.expert_bias", "mixer.gate.e_score_correction_bias"),
             ("mlp.shared_experts.linear_fc1.weight", "mixer.shared_experts.up_proj.weight"),
             ("mlp.shared_experts.linear_fc2.weight", "mixer.shared_experts.down_proj.weight")]
    if cfg.moe_latent_size:
        names += [("mlp.fc1_latent_proj.weight", "mixer.fc1_latent_proj.weight"),
                  ("mlp.fc2_latent_proj.weight", "mixer.fc2_latent_proj.weight")]
    for k in range(cfg.num_experts):
        ours, theirs = f"mlp.experts.local_experts.{k}.", f"mixer.experts.{k}."
        names += [(ours + "linear_fc1.weight", theirs + "up_proj.weight"),
                  (ours + "linear_fc2.weight", theirs + "down_proj.weight")]
    return names


def _qkv_split(qkv: torch.Tensor, cfg: ModelConfig):
    """megatron linear_qkv [g·(q/g + 2)·d, h] → (q [n·d, h], k [g·d, h], v [g·d, h])."""
    g, d = cfg.num_query_groups, cfg.head_dim
    per = cfg.num_attention_heads // g
    w = qkv.reshape(g, per + 2, d, -1)
    h = w.shape[-1]
    return (w[:, :per].reshape(-1, h), w[:, per].reshape(-1, h), w[:, per + 1].reshape(-1, h))


def _qkv_join(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    g, d = cfg.num_query_groups, cfg.head_dim
    per = cfg.num_attention_heads // g
    h = q.shape[-1]
    w = torch.cat([q.reshape(g, per, d, h), k.reshape(g, 1, d, h), v.reshape(g, 1, d, h)], dim=1)
    return w.reshape(-1, h)


def _layers(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    """(megatron prefix, HF prefix, symbol) of every layer, MTP included.

    megatron-core 0.16.1's MTP block p holds one ``transformer_layer`` (attention + MoE/MLP); HF
    flattens it into layers ``mtp.layers.{L·p}`` (attention) and ``{L·p + 1}`` (MoE/MLP), L = 2.
    Both halves share the megatron prefix: their names (``input_layernorm``/``self_attention`` vs
    ``pre_mlp_layernorm``/``mlp``) do not overlap."""
    out = [(f"decoder.layers.{i}.", f"backbone.layers.{i}.", s)
           for i, s in enumerate(cfg.layer_pattern)]
    if cfg.mtp_depths:
        block = cfg.mtp_depths[0]
        for p in range(mtp_blocks(cfg)):
            out += [(f"mtp.layers.{p}.transformer_layer.", f"mtp.layers.{len(block) * p + j}.", s)
                    for j, s in enumerate(block)]
    return out


def _mtp_block_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(megatron, HF) names of the MTP weights outside the transformer layer: the embedding and
    hidden-state norms and ``eh_proj`` [h, 2h] (input: [enorm(embedding), hnorm(hidden)], in that
    order on both sides) on a block's first HF layer, ``final_layernorm`` on its last."""
    if not cfg.mtp_depths:
        return []
    n, names = len(cfg.mtp_depths[0]), []
    for p in range(mtp_blocks(cfg)):
        names += [(f"mtp.layers.{p}.{w}.weight", f"mtp.layers.{n * p}.{w}.weight")
                  for w in ("enorm", "hnorm", "eh_proj")]
        names.append((f"mtp.layers.{p}.final_layernorm.weight",
                      f"mtp.layers.{n * p + n - 1}.final_layernorm.weight"))
    return names


def _hf_plan(cfg: ModelConfig) -> list[tuple[list[str], Callable[..., dict[str, torch.Tensor]]]]:
    """Every HF tensor as (the megatron weights it is made of, a function of those weights → its HF
    names and tensors), in layer order: a converter that loads one layer at a time reads each layer
    once (``CheckpointState``)."""
    plan = []

    def rename(src, dst):
        plan.append(([src], lambda t: {dst: t}))

    rename("embedding.word_embeddings.weight", "backbone.embeddings.weight")
    for src, dst, symbol in _layers(cfg):
        for a, b in _layer_names(symbol, cfg):
            rename(src + a, dst + b)
        if symbol == ATTENTION:
            names = [dst + f"mixer.{n}_proj.weight" for n in "qkv"]
            plan.append(([src + "self_attention.linear_qkv.weight"],
                         lambda qkv, names=names: dict(zip(names, _qkv_split(qkv, cfg)))))
    for src, dst in _mtp_block_names(cfg):
        rename(src, dst)
    rename("decoder.final_norm.weight", "backbone.norm_f.weight")
    if cfg.untie_embeddings_and_output_weights:
        rename("output_layer.weight", "lm_head.weight")
    else:
        # transformers 5.23's NemotronH declares no tied weights: with tie_word_embeddings and no
        # lm_head in the file it initialises a random head. Writing the (identical) head keeps
        # both kinds of reader right. A copy: safetensors refuses two names for one storage.
        plan.append((["embedding.word_embeddings.weight"], lambda t: {"lm_head.weight": t.clone()}))
    return plan


def iter_hf_tensors(state: Mapping[str, torch.Tensor], cfg: ModelConfig
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every ``nemotron_h`` weight (``backbone.*``, ``mtp.*``,
    ``lm_head.weight``) from a full (TP=PP=EP=1) megatron-core state of the hybrid model, in layer
    order. Missing or left-over weights raise before the first tensor is read."""
    plan = _hf_plan(cfg)
    needed = {name for names, _ in plan for name in names}
    have = {k for k in state.keys() if not k.endswith("_extra_state")}
    missing = sorted(needed - have)
    if missing:
        raise HFConversionError(f"megatron state has no {missing[0]!r} (and {len(missing) - 1} more)"
                                if len(missing) > 1 else f"megatron state has no {missing[0]!r}")
    left = sorted(have - needed)
    if left:
        raise HFConversionError(f"megatron weights with no HF counterpart: {left[:8]}")
    for names, convert in plan:
        yield from convert(*(state[name] for name in names)).items()


def megatron_to_hf_state(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """``iter_hf_tensors`` as a dict."""
    return dict(iter_hf_tensors(state, cfg))


def hf_to_megatron_state(hf_state: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of ``megatron_to_hf_state``. Accepts ``backbone.``/``model.`` prefixes and
    stacked experts (``experts.up_proj`` [E, I, in]). ``mtp.*`` weights are read when ``cfg``
    has MTP depths and left out when it has none (transformers does the same)."""
    hf = {}
    for key, t in hf_state.items():
        key = re.sub(r"^(backbone|model)\.", "backbone.", key)
        m = re.match(r"(.*\.mixer\.experts)\.(up_proj|down_proj)$", key)
        if m:  # stacked experts → one tensor per expert
            for k in range(t.shape[0]):
                hf[f"{m.group(1)}.{k}.{m.group(2)}.weight"] = t[k]
        else:
            hf[key] = t
    out, used = {}, set()

    def take(src, dst):
        if src not in hf:
            raise HFConversionError(f"HF checkpoint has no {src!r}")
        out[dst] = hf[src]
        used.add(src)

    take("backbone.embeddings.weight", "embedding.word_embeddings.weight")
    for ours, theirs, symbol in _layers(cfg):
        for a, b in _layer_names(symbol, cfg):
            if symbol == MOE and b.endswith("e_score_correction_bias") and theirs + b not in hf:
                out[ours + a] = torch.zeros(cfg.num_experts)
                continue
            take(theirs + b, ours + a)
        if symbol == ATTENTION:
            names = [theirs + f"mixer.{n}_proj.weight" for n in "qkv"]
            for name in names:
                if name not in hf:
                    raise HFConversionError(f"HF checkpoint has no {name!r}")
            used.update(names)
            out[ours + "self_attention.linear_qkv.weight"] = _qkv_join(*(hf[n] for n in names), cfg)
    for ours, theirs in _mtp_block_names(cfg):
        take(theirs, ours)
    take("backbone.norm_f.weight", "decoder.final_norm.weight")
    if cfg.untie_embeddings_and_output_weights:
        take("lm_head.weight", "output_layer.weight")
    left = sorted(k for k in set(hf) - used
                  if k != "lm_head.weight" and (cfg.mtp_depths or not k.startswith("mtp.")))
    if left:
        raise HFConversionError(f"HF weights with no hymoe counterpart: {left[:8]}")
    return out


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def _write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], path: Path,
                       max_shard_bytes: int) -> None:
    """(name, tensor) pairs into ``model.safetensors``, or into shards of at most
    ``max_shard_bytes`` (a larger tensor alone) with an index, holding one shard in memory."""
    from safetensors.torch import save_file

    written = []  # (file, {name: bytes}) per shard, named once their number is known

    def flush(shard):
        tmp = path / f".model-{len(written):05d}.safetensors.tmp"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        written.append((tmp, {k: t.numel() * t.element_size() for k, t in shard.items()}))

    current, size = {}, 0
    for key, t in tensors:
        t = t.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes
    flush(current)
    del current
    if len(written) == 1:
        os.replace(written[0][0], path / "model.safetensors")
        return
    weight_map, total = {}, 0
    for i, (tmp, sizes) in enumerate(written):
        name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(tmp, path / name)
        weight_map.update(dict.fromkeys(sizes, name))
        total += sum(sizes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def safetensors_files(path: Path) -> list[str]:
    """The weight files of an HF folder: ``model.safetensors``, or those of its sharded index."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (path / "model.safetensors").exists():
        return ["model.safetensors"]
    raise HFConversionError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_hf_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder (``model.safetensors`` or a sharded index)."""
    from safetensors.torch import load_file

    path = Path(path)
    state = {}
    for f in safetensors_files(path):
        state.update(load_file(str(path / f)))
    return state


def to_hf(
    model_or_state,
    path: str | os.PathLike,
    model_cfg: Optional[ModelConfig] = None,
    vocab_size: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``path/config.json`` and the safetensors that ``NemotronHForCausalLM`` loads.

    ``model_or_state``: a hymoe model (TP=PP=EP=1; the whole model in this process), its
    ``state_dict()``, or a ``CheckpointState`` (read layer by layer); a state needs ``model_cfg``
    (and ``vocab_size`` unless the config has it). Tensors are written as they are converted,
    one output shard (``max_shard_bytes``) in memory at a time. ``dtype``: cast floating weights
    (A_log, D, dt_bias and the routing bias stay fp32).
    """
    if isinstance(model_or_state, torch.nn.Module):
        model = getattr(model_or_state, "module", model_or_state)
        model_cfg = model_cfg or model_config_of(model)
        vocab_size = vocab_size or model.vocab_size
        state = model.state_dict()
    else:
        state = model_or_state
        if model_cfg is None:
            raise HFConversionError("to_hf(state_dict, ...) needs model_cfg")
    vocab_size = vocab_size or model_cfg.vocab_size
    if not vocab_size:
        raise HFConversionError("vocab_size: unknown; pass vocab_size=")

    def cast(key, t):
        if dtype is None or not t.is_floating_point():
            return t
        return t.float() if key.endswith(_FP32_KEYS) else t.to(dtype)

    tensors = ((k, cast(k, t)) for k, t in iter_hf_tensors(state, model_cfg))
    out_dtype = dtype or state["embedding.word_embeddings.weight"].dtype
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = hf_config(model_cfg, vocab_size, out_dtype)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_safetensors(tensors, path, max_shard_bytes)
    return path


def load_hf(path: str | os.PathLike, mtp_depths: Optional[int] = None
            ) -> tuple[ModelConfig, int, dict[str, torch.Tensor]]:
    """(ModelConfig, vocab_size, megatron state dict) of an HF ``nemotron_h`` folder.
    ``mtp_depths``: depths of a shared MTP block (see ``model_config_from_hf``)."""
    path = Path(path)
    hf = json.loads((path / "config.json").read_text())
    cfg, vocab = model_config_from_hf(hf, name=path.name, mtp_depths=mtp_depths)
    return cfg, vocab, hf_to_megatron_state(read_hf_state(path), cfg)


# ----------------------------------------------------------------------------------------------
# building on CPU in this process
# ----------------------------------------------------------------------------------------------
def build_single_process(cfg: ModelConfig, vocab_size: int, dtype: torch.dtype = torch.float32,
                         initialize: bool = True, seed: int = 0):
    """The whole model in this process (a world of one is created if there is none; an existing
    megatron layout must be TP=PP=EP=CP=1). Weights are initialised unless ``initialize=False``."""
    from megatron.core import parallel_state

    from hymoe.model.build import build_model, build_transformer_config
    from hymoe.parallel.layout import ParallelConfig
    from hymoe.parallel.setup import init_distributed, initialize_model_parallel

    init_distributed()
    if parallel_state.model_parallel_is_initialized():
        sizes = (parallel_state.get_tensor_model_parallel_world_size(),
                 parallel_state.get_pipeline_model_parallel_world_size(),
                 parallel_state.get_expert_model_parallel_world_size(),
                 parallel_state.get_context_parallel_world_size())
        if sizes != (1, 1, 1, 1):
            raise HFConversionError(
                f"the whole model needs TP=PP=EP=CP=1; this process has {sizes}"
            )
    else:
        initialize_model_parallel(ParallelConfig(), seed=seed)
    tconfig = build_transformer_config(cfg, params_dtype=dtype, perform_initialization=initialize)
    model = build_model(cfg, tconfig, vocab_size=vocab_size)
    if cfg.mamba_dt_min_clamp:
        # The mixer takes dt_limit at construction; until build.py passes it from the config,
        # set it here so that the model computes what the HF checkpoint was evaluated with.
        for m in model.modules():
            if hasattr(m, "dt_limit") and hasattr(m, "A_log"):
                m.dt_limit = (cfg.mamba_dt_min_clamp, math.inf)
    model.hymoe_model_config = cfg
    return model


def load_into(model, state: dict) -> None:
    """Copy a full megatron state dict into ``model``: every weight must be there, no extras."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise HFConversionError(
            f"state mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )


def from_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
            mtp_depths: Optional[int] = None):
    """A hymoe (megatron-core) model with the weights of an HF ``nemotron_h`` folder, MTP
    included, built on CPU in this process. Its ModelConfig is ``model.hymoe_model_config``.
    ``mtp_depths``: depths of a shared MTP block; the released Super checkpoint does not record
    them (it was trained with 2)."""
    cfg, vocab, state = load_hf(path, mtp_depths=mtp_depths)
    model = build_single_process(cfg, vocab, dtype=dtype, initialize=False)
    load_into(model, {k: v.to(dtype) if k.split(".")[-1] not in _FP32_KEYS else v
                      for k, v in state.items()})
    return model


class CheckpointState(Mapping):
    """The full (TP=PP=EP=1) state dict of a megatron dist-checkpoint written under any layout,
    read one layer at a time: a weight is loaded with the rest of its layer (megatron-core
    reshards it onto one process) and kept until a weight of another layer is asked for. So a
    conversion in layer order holds one layer, never the model. ``model``: the model built on the
    meta device (its sharded state dict names the checkpoint's tensors, allocates nothing).
    ``on_load(done, total)`` is called after each layer is read (a progress bar)."""

    def __init__(self, model, checkpoint: str | os.PathLike, on_load=None):
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        self._checkpoint = str(checkpoint)
        self._sharded = {k: v for k, v in model.sharded_state_dict().items()
                         if not isinstance(v, ShardedObject)}  # _extra_state: nothing to convert
        self._groups = {}
        for key in self._sharded:
            self._groups.setdefault(self._group(key), []).append(key)
        self._on_load, self._done = on_load, set()
        self._group_name, self._loaded = None, {}

    @staticmethod
    def _group(key: str) -> str:
        m = re.match(r"(decoder|mtp)\.layers\.\d+\.", key)
        return m.group(0) if m else key

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._sharded:
            raise KeyError(key)
        group = self._group(key)
        if group != self._group_name:
            self._loaded = {}  # the previous layer goes before the next one arrives
            self._loaded, self._group_name = self._load(self._groups[group]), group
            self._done.add(group)
            if self._on_load is not None:
                self._on_load(len(self._done), len(self._groups))
        return self._loaded[key]

    def _load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        import dataclasses

        from megatron.core import dist_checkpointing

        # Each sharded entry gets a real (CPU) tensor of its meta tensor's shape to load into.
        sub = {k: dataclasses.replace(self._sharded[k], data=torch.empty_like(
            self._sharded[k].data, device="cpu")) for k in keys}
        with torch.no_grad():
            return dist_checkpointing.load({"model": sub}, self._checkpoint)["model"]

    def __iter__(self):
        return iter(self._sharded)

    def __len__(self) -> int:
        return len(self._sharded)


def checkpoint_to_hf(checkpoint: str | os.PathLike, model_cfg: ModelConfig, vocab_size: int,
                     out: str | os.PathLike, dtype: Optional[torch.dtype] = None,
                     max_shard_bytes: int = 5 * 2**30, on_load=None) -> Path:
    """Convert a megatron dist-checkpoint (the ``model`` entry, as hymoe's trainer saves it)
    written under any TP/PP/EP layout, layer by layer (``CheckpointState``): memory holds one
    layer and one output shard, whatever the model's size. (Checking the checkpoint's file table
    is the caller's: ``hymoe.train.checkpoint.verify``; ``model`` may not import ``train``.)"""
    if not Path(checkpoint, "metadata.json").exists():
        raise HFConversionError(f"{checkpoint}: not a megatron dist-checkpoint (no metadata.json)")
    with torch.device("meta"):
        model = build_single_process(model_cfg, vocab_size, initialize=False)
    state = CheckpointState(model, checkpoint, on_load)
    return to_hf(state, out, model_cfg=model_cfg, vocab_size=vocab_size, dtype=dtype,
                 max_shard_bytes=max_shard_bytes)


# HFConversionError is hf_config.py's, listed here too: everything in this file raises it, so
# callers of to_hf/from_hf catch it from here.
__all__ = ["to_hf", "from_hf", "load_hf", "checkpoint_to_hf", "CheckpointState",
           "build_single_process", "load_into", "megatron_to_hf_state", "iter_hf_tensors",
           "hf_to_megatron_state", "read_hf_state", "HFConversionError"]
