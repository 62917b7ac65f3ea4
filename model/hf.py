"""Hugging Face ``nemotron_h`` interop: the format of the released Nemotron 3 checkpoints, which
transformers' ``NemotronHForCausalLM`` reads (config.json + safetensors).

    to_hf(model_or_state, path, model_cfg=None)   hymoe/megatron-core (TP=PP=EP=1) → HF folder
    load_hf(path) → (ModelConfig, vocab, state)    HF folder → megatron state dict (no model)
    from_hf(path) → model                          the same, built on CPU in this process
    checkpoint_to_hf(ckpt, model_cfg, vocab, out)  a dist-checkpoint of any TP/PP/EP layout → HF

The weight mapping (docs/model.md has it as a table) is a renaming except for attention: megatron
stores ``linear_qkv`` grouped by KV head, ``[g0: q…q k v | g1: q…q k v | …]``; HF has separate
``q_proj``/``k_proj``/``v_proj``. The Mamba ``in_proj`` (z, x, B, C, dt) and ``conv1d`` (x, B, C)
layouts are the same on both sides. Experts are written one tensor per expert
(``experts.{k}.up_proj.weight``), as in the released checkpoints; the stacked in-memory form that
transformers builds on load (``experts.up_proj`` [E, I, in]) is read as well.

Semantics that differ between megatron-core and transformers, and what is done about them:
- dt clamp: HF clamps softplus(dt) at ``time_step_min`` in its chunked (prefill) path; megatron-core
  has no clamp. ``ModelConfig.mamba_dt_min_clamp`` carries it (0 = none); ``to_hf`` writes
  ``time_step_min=1e-30`` for 0 (HF's initialiser takes its log, so 0 itself crashes it).
- top-k normalisation: megatron normalises sigmoid top-k weights only when top-k > 1; HF
  normalises whenever ``norm_topk_prob``. ``to_hf`` writes ``norm_topk_prob = topk > 1``;
  ``load_hf`` refuses the two combinations megatron cannot express.
- group-limited routing (``n_group`` > 1): HF scores a group by its top-2 experts, megatron by its
  top-(topk/groups); hymoe has no grouped routing, so ``load_hf`` refuses ``n_group`` > 1.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Optional

import torch

from hymoe.model.config import ModelConfig
from hymoe.model.pattern import ATTENTION, MAMBA, MLP, MOE

HF_LAYER_TYPE = {MAMBA: "linear_attention", ATTENTION: "full_attention", MOE: "moe", MLP: "mlp"}
_SYMBOL = {v: k for k, v in HF_LAYER_TYPE.items()}
# HF's initialiser takes log(time_step_min); the smallest clamp that changes nothing in fp32.
_NO_DT_CLAMP = 1e-30
# Kept in fp32 whatever the export dtype (decay rates; the routing bias is fp32 in both).
_FP32_KEYS = ("A_log", "D", "dt_bias", "e_score_correction_bias")


class HFConversionError(ValueError):
    """A config or checkpoint that cannot be converted; the message names the field."""


# ----------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------
def hf_config(cfg: ModelConfig, vocab_size: int, dtype: torch.dtype = torch.float32) -> dict:
    """The ``nemotron_h`` config.json for ``cfg``."""
    cfg.validate()
    layers = cfg.layer_pattern
    if MOE in layers and not cfg.moe_shared_expert_intermediate_size:
        raise HFConversionError(
            "model.moe_shared_expert_intermediate_size: HF nemotron_h always has a shared expert"
        )
    d_inner = cfg.mamba_num_heads * cfg.mamba_head_dim
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "layers_block_type": [HF_LAYER_TYPE[s] for s in layers],
        # For readers of the older remote-code config (vLLM, transformers < 5).
        "hybrid_override_pattern": layers,
        "num_hidden_layers": len(layers),
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "max_position_embeddings": cfg.max_sequence_length,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "attention_bias": False,
        "intermediate_size": cfg.ffn_hidden_size,
        "mlp_hidden_act": "relu2",
        "mlp_bias": False,
        "use_bias": False,
        "ssm_state_size": cfg.mamba_state_dim,
        "mamba_num_heads": cfg.mamba_num_heads,
        "mamba_head_dim": cfg.mamba_head_dim,
        "mamba_hidden_act": "silu",
        "n_groups": cfg.mamba_num_groups,
        "conv_kernel": 4,
        "expand": max(1, d_inner // cfg.hidden_size),  # informational; HF uses heads × head_dim
        "chunk_size": cfg.mamba_chunk_size,
        "use_conv_bias": True,
        "mamba_proj_bias": False,
        "time_step_min": cfg.mamba_dt_min_clamp or _NO_DT_CLAMP,
        "time_step_max": 0.1,
        "time_step_floor": 1e-4,
        "time_step_limit": [0.0, float("inf")],
        "n_routed_experts": cfg.num_experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": cfg.moe_router_topk,
        "moe_intermediate_size": cfg.moe_ffn_hidden_size,
        "moe_shared_expert_intermediate_size": cfg.moe_shared_expert_intermediate_size or 0,
        "moe_latent_size": cfg.moe_latent_size,
        "moe_shared_expert_overlap": False,
        "routed_scaling_factor": cfg.moe_router_topk_scaling_factor or 1.0,
        "norm_topk_prob": cfg.moe_router_topk > 1,
        "n_group": 1,
        "topk_group": 1,
        "layer_norm_epsilon": cfg.layernorm_epsilon,
        "initializer_range": cfg.init_method_std,
        "residual_in_fp32": True,
        "num_nextn_predict_layers": 0,  # MTP export arrives with hymoe.model.mtp
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def model_config_from_hf(hf: dict, name: str = "hf") -> tuple[ModelConfig, int]:
    """(ModelConfig, vocab_size) from a ``nemotron_h`` config.json dict; refuses what megatron-core
    computes differently (see the module docstring)."""
    if hf.get("model_type") != "nemotron_h":
        raise HFConversionError(f"model_type: expected 'nemotron_h', got {hf.get('model_type')!r}")
    types = hf.get("layers_block_type") or hf.get("layer_types")
    if types is None:
        pattern = hf["hybrid_override_pattern"]
    else:
        unknown = sorted(set(types) - set(_SYMBOL))
        if unknown:
            raise HFConversionError(f"layers_block_type: unsupported layer types {unknown}")
        pattern = "".join(_SYMBOL[t] for t in types)

    def refuse(cond, key, why):
        if cond:
            raise HFConversionError(f"{key}={hf.get(key)!r}: {why}")

    for key in ("use_bias", "mlp_bias", "attention_bias", "mamba_proj_bias"):
        refuse(hf.get(key, False), key, "biases are not supported (Nemotron 3 has none)")
    refuse(hf.get("mlp_hidden_act", "relu2") != "relu2", "mlp_hidden_act", "only relu2")
    refuse(hf.get("mamba_hidden_act", "silu") != "silu", "mamba_hidden_act", "only silu")
    refuse(hf.get("conv_kernel", 4) != 4, "conv_kernel", "the Mamba conv kernel is 4")
    refuse(hf.get("n_group", 1) != 1 or hf.get("topk_group", 1) != 1, "n_group",
           "group-limited routing differs between megatron-core and transformers; not supported")
    topk = hf.get("num_experts_per_tok", 2)
    norm = hf.get("norm_topk_prob", True)
    if MOE in pattern:
        refuse(topk > 1 and not norm, "norm_topk_prob",
               "megatron-core always normalises sigmoid top-k weights when top-k > 1")
        refuse(topk == 1 and norm, "norm_topk_prob",
               "with top-1 megatron-core keeps the sigmoid score (HF would use 1.0)")
        refuse(not hf.get("moe_shared_expert_intermediate_size"),
               "moe_shared_expert_intermediate_size", "a shared expert is required")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    mamba_heads = hf.get("mamba_num_heads", 128)
    step_min = hf.get("time_step_min", 1e-3)
    cfg = ModelConfig(
        name=name,
        pattern=pattern,
        hidden_size=hf["hidden_size"],
        vocab_size=hf["vocab_size"],
        max_sequence_length=hf.get("max_position_embeddings", 4096),
        layernorm_epsilon=eps,
        init_method_std=hf.get("initializer_range", 0.02),
        num_attention_heads=hf.get("num_attention_heads", 32),
        num_query_groups=hf.get("num_key_value_heads") or hf.get("num_attention_heads", 32),
        head_dim=hf.get("head_dim", 128),
        ffn_hidden_size=hf.get("intermediate_size", 21504),
        mamba_num_heads=mamba_heads,
        mamba_head_dim=hf.get("mamba_head_dim", 64),
        mamba_state_dim=hf.get("ssm_state_size", 128),
        mamba_num_groups=hf.get("n_groups", 8),
        mamba_chunk_size=hf.get("chunk_size", 128),
        mamba_dt_min_clamp=0.0 if step_min <= 1e-20 else float(step_min),
        num_experts=hf.get("n_routed_experts", 8),
        moe_router_topk=topk,
        moe_ffn_hidden_size=hf.get("moe_intermediate_size", 7688),
        moe_shared_expert_intermediate_size=hf.get("moe_shared_expert_intermediate_size"),
        moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        moe_latent_size=hf.get("moe_latent_size"),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
    )
    cfg.validate()
    return cfg, hf["vocab_size"]


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


def megatron_to_hf_state(state: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF ``nemotron_h`` tensors (``backbone.*``, ``lm_head.weight``) from a full (TP=PP=EP=1)
    megatron-core state dict of the hybrid model. Raises on missing or left-over weights."""
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    out, used = {}, set()

    def take(src, dst):
        if src not in state:
            raise HFConversionError(f"megatron state has no {src!r} (expected for {dst})")
        out[dst] = state[src]
        used.add(src)

    take("embedding.word_embeddings.weight", "backbone.embeddings.weight")
    for i, symbol in enumerate(cfg.layer_pattern):
        src, dst = f"decoder.layers.{i}.", f"backbone.layers.{i}."
        for a, b in _layer_names(symbol, cfg):
            take(src + a, dst + b)
        if symbol == ATTENTION:
            key = src + "self_attention.linear_qkv.weight"
            take(key, dst + "mixer.qkv")  # placeholder, replaced below
            q, k, v = _qkv_split(out.pop(dst + "mixer.qkv"), cfg)
            out[dst + "mixer.q_proj.weight"] = q
            out[dst + "mixer.k_proj.weight"] = k
            out[dst + "mixer.v_proj.weight"] = v
    take("decoder.final_norm.weight", "backbone.norm_f.weight")
    if cfg.untie_embeddings_and_output_weights:
        take("output_layer.weight", "lm_head.weight")
    else:
        # transformers 5.23's NemotronH declares no tied weights: with tie_word_embeddings and no
        # lm_head in the file it initialises a random head. Writing the (identical) head keeps
        # both kinds of reader right.
        out["lm_head.weight"] = out["backbone.embeddings.weight"].clone()
    left = sorted(k for k in set(state) - used if not k.startswith("mtp."))
    if left:
        raise HFConversionError(f"megatron weights with no HF counterpart: {left[:8]}")
    return out


def hf_to_megatron_state(hf_state: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of ``megatron_to_hf_state``. Accepts ``backbone.``/``model.`` prefixes and
    stacked experts (``experts.up_proj`` [E, I, in]); ``mtp.*`` weights are left out."""
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
    for i, symbol in enumerate(cfg.layer_pattern):
        src, dst = f"backbone.layers.{i}.", f"decoder.layers.{i}."
        for a, b in _layer_names(symbol, cfg):
            if symbol == MOE and b.endswith("e_score_correction_bias") and src + b not in hf:
                out[dst + a] = torch.zeros(cfg.num_experts)
                continue
            take(src + b, dst + a)
        if symbol == ATTENTION:
            qkv = [hf[src + f"mixer.{n}_proj.weight"] for n in "qkv"]
            used.update(src + f"mixer.{n}_proj.weight" for n in "qkv")
            out[dst + "self_attention.linear_qkv.weight"] = _qkv_join(*qkv, cfg)
    take("backbone.norm_f.weight", "decoder.final_norm.weight")
    if cfg.untie_embeddings_and_output_weights:
        take("lm_head.weight", "output_layer.weight")
    left = sorted(k for k in set(hf) - used if not k.startswith("mtp.") and k != "lm_head.weight")
    if left:
        raise HFConversionError(f"HF weights with no hymoe counterpart: {left[:8]}")
    return out


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def _write_safetensors(tensors: dict, path: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata=meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata=meta)
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def read_hf_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder (``model.safetensors`` or a sharded index)."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise HFConversionError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state


def model_config_of(model) -> ModelConfig:
    """The ModelConfig of a model built by ``hymoe.model.build.build_model`` (pp=1)."""
    given = getattr(model, "hymoe_model_config", None)
    if given is not None:
        return given
    tc = model.config
    kw = dict(
        pattern=model.hybrid_override_pattern, hidden_size=tc.hidden_size,
        vocab_size=model.vocab_size, max_sequence_length=model.max_sequence_length,
        layernorm_epsilon=tc.layernorm_epsilon, init_method_std=tc.init_method_std,
        num_attention_heads=tc.num_attention_heads, num_query_groups=tc.num_query_groups,
        head_dim=tc.kv_channels, ffn_hidden_size=tc.ffn_hidden_size,
        mamba_num_heads=tc.mamba_num_heads, mamba_head_dim=tc.mamba_head_dim,
        mamba_state_dim=tc.mamba_state_dim, mamba_num_groups=tc.mamba_num_groups,
        mamba_chunk_size=getattr(tc, "hymoe_mamba_chunk_size", 128),
        untie_embeddings_and_output_weights=not model.share_embeddings_and_output_weights,
    )
    mixers = [m for m in model.modules() if hasattr(m, "dt_limit") and hasattr(m, "A_log")]
    if mixers:
        kw["mamba_dt_min_clamp"] = float(mixers[0].dt_limit[0])
    if tc.num_moe_experts:
        kw.update(
            num_experts=tc.num_moe_experts, moe_router_topk=tc.moe_router_topk,
            moe_ffn_hidden_size=tc.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=tc.moe_shared_expert_intermediate_size,
            moe_router_topk_scaling_factor=tc.moe_router_topk_scaling_factor,
            moe_latent_size=tc.moe_latent_size,
        )
    return ModelConfig(**kw)


def to_hf(
    model_or_state,
    path: str | os.PathLike,
    model_cfg: Optional[ModelConfig] = None,
    vocab_size: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``path/config.json`` and the safetensors that ``NemotronHForCausalLM`` loads.

    ``model_or_state``: a hymoe model (TP=PP=EP=1; the whole model in this process) or its
    ``state_dict()``; a state dict needs ``model_cfg`` (and ``vocab_size`` unless the config has
    it). ``dtype``: cast floating weights (A_log, D, dt_bias and the routing bias stay fp32).
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
    tensors = megatron_to_hf_state(state, model_cfg)
    if dtype is not None:
        def cast(key, t):
            if not t.is_floating_point():
                return t
            return t.float() if key.endswith(_FP32_KEYS) else t.to(dtype)

        tensors = {k: cast(k, t) for k, t in tensors.items()}
    out_dtype = dtype or tensors["backbone.embeddings.weight"].dtype
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = hf_config(model_cfg, vocab_size, out_dtype)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_safetensors(tensors, path, max_shard_bytes)
    return path


def load_hf(path: str | os.PathLike) -> tuple[ModelConfig, int, dict[str, torch.Tensor]]:
    """(ModelConfig, vocab_size, megatron state dict) of an HF ``nemotron_h`` folder."""
    path = Path(path)
    hf = json.loads((path / "config.json").read_text())
    cfg, vocab = model_config_from_hf(hf, name=path.name)
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


def from_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A hymoe (megatron-core) model with the weights of an HF ``nemotron_h`` folder, built on CPU
    in this process. Its ModelConfig is ``model.hymoe_model_config``."""
    cfg, vocab, state = load_hf(path)
    model = build_single_process(cfg, vocab, dtype=dtype, initialize=False)
    load_into(model, {k: v.to(dtype) if k.split(".")[-1] not in _FP32_KEYS else v
                      for k, v in state.items()})
    return model


def checkpoint_to_hf(checkpoint: str | os.PathLike, model_cfg: ModelConfig, vocab_size: int,
                     out: str | os.PathLike, dtype: Optional[torch.dtype] = None) -> Path:
    """Convert a megatron dist-checkpoint (the ``model`` entry, as hymoe's trainer saves it)
    written under any TP/PP/EP layout: megatron-core reshards it onto a TP=PP=EP=1 model in this
    process, which is then written with ``to_hf``. (Checking the checkpoint's file table is the
    caller's: ``hymoe.train.checkpoint.verify``; ``model`` may not import ``train``.)"""
    from megatron.core import dist_checkpointing

    if not Path(checkpoint, "metadata.json").exists():
        raise HFConversionError(f"{checkpoint}: not a megatron dist-checkpoint (no metadata.json)")
    model = build_single_process(model_cfg, vocab_size, initialize=False)
    with torch.no_grad():
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(checkpoint))
    model.load_state_dict(state["model"], strict=True)
    return to_hf(model, out, model_cfg=model_cfg, vocab_size=vocab_size, dtype=dtype)


__all__ = ["to_hf", "from_hf", "load_hf", "checkpoint_to_hf", "hf_config", "model_config_from_hf",
           "megatron_to_hf_state", "hf_to_megatron_state", "read_hf_state", "HFConversionError"]
