"""Hugging Face ``nemotron_h`` config.json ↔ hymoe ``ModelConfig`` (the weights are hf.py's):
which fields map to which, and what is refused because megatron-core computes it differently.

Semantics that differ between megatron-core and transformers, and what is done about them:
- dt clamp: HF clamps softplus(dt) at ``time_step_min`` in its chunked (prefill) path; megatron-core
  has no clamp. ``ModelConfig.mamba_dt_min_clamp`` carries it (0 = none); ``hf_config`` writes
  ``time_step_min=1e-30`` for 0 (HF's initialiser takes its log, so 0 itself crashes it).
- top-k normalisation: megatron normalises sigmoid top-k weights only when top-k > 1; HF
  normalises whenever ``norm_topk_prob``. ``hf_config`` writes ``norm_topk_prob = topk > 1``;
  ``model_config_from_hf`` refuses the two combinations megatron cannot express.
- group-limited routing (``n_group`` > 1): HF scores a group by its top-2 experts, megatron by its
  top-(topk/groups); hymoe has no grouped routing, so ``model_config_from_hf`` refuses it.

Multi-Token Prediction: ``num_nextn_predict_layers`` counts physical MTP blocks (weight sets), not
depths. A shared-layer model (``mtp_shared_layer``, Super's 2 depths of one layer) has one block;
the released Super config does not record its depths, hence ``mtp_depths`` on the way in.
"""

from __future__ import annotations

from typing import Optional

import torch

from hymoe.model.config import ModelConfig
from hymoe.model.pattern import ATTENTION, MAMBA, MLP, MOE, MTP, MTP_DEPTHS

HF_LAYER_TYPE = {MAMBA: "linear_attention", ATTENTION: "full_attention", MOE: "moe", MLP: "mlp"}
# Older configs (remote code, transformers < 5) name two of the types differently.
_SYMBOL = {**{v: k for k, v in HF_LAYER_TYPE.items()}, "mamba": MAMBA, "attention": ATTENTION}
# HF's initialiser takes log(time_step_min); the smallest clamp that changes nothing in fp32.
_NO_DT_CLAMP = 1e-30


class HFConversionError(ValueError):
    """A config or checkpoint that cannot be converted; the message names the field."""


def hf_config(cfg: ModelConfig, vocab_size: int, dtype: torch.dtype = torch.float32) -> dict:
    """The ``nemotron_h`` config.json for ``cfg``."""
    cfg.validate()
    layers = cfg.layer_pattern
    if MOE in layers + "".join(cfg.mtp_depths) and not cfg.moe_shared_expert_intermediate_size:
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
        "num_nextn_predict_layers": mtp_blocks(cfg),
        "torch_dtype": str(dtype).removeprefix("torch."),
        **_mtp_config(cfg),
    }


def mtp_blocks(cfg: ModelConfig) -> int:
    """Physical MTP blocks (weight sets): one for a shared layer, else one per depth."""
    depths = cfg.mtp_depths
    return min(1, len(depths)) if cfg.mtp_shared_layer else len(depths)


def _mtp_config(cfg: ModelConfig) -> dict:
    """config.json's MTP fields beyond ``num_nextn_predict_layers`` (none without MTP)."""
    depths = cfg.mtp_depths
    if not depths:
        return {}
    return {
        # transformers 5 reads the list; Megatron-Bridge, vLLM and the released Super config use
        # the string.
        "mtp_layers_block_type": [HF_LAYER_TYPE[s] for s in depths[0]],
        "mtp_hybrid_override_pattern": depths[0],
        # Megatron's names and meaning (Megatron-Bridge's nemotron_h import reads the first two):
        # one block run at every depth, and how many depths training ran. The released Super
        # config records neither; readers that do not know them see one MTP block.
        "mtp_use_repeated_layer": cfg.mtp_shared_layer,
        "mtp_num_layers": len(depths),
        "mtp_loss_scaling_factor": cfg.mtp_loss_scale,
    }


def _mtp_from_hf(hf: dict, depths: Optional[int]) -> tuple[str, bool, float]:
    """(MTP part of the pattern, e.g. "/*E/*E"; mtp_shared_layer; mtp_loss_scale) of an HF config.
    ``depths`` overrides the number of depths a shared block runs (the released Super checkpoint
    does not record its 2)."""
    blocks = int(hf.get("num_nextn_predict_layers") or 0)
    scale = float(hf.get("mtp_loss_scaling_factor", 0.3))
    if blocks <= 0:
        if depths:
            raise HFConversionError(f"num_nextn_predict_layers={blocks}: the checkpoint has no MTP "
                                    f"block to run for mtp_depths={depths}")
        return "", False, scale
    text = hf.get("mtp_hybrid_override_pattern")
    types = hf.get("mtp_layers_block_type")
    from_types = None
    if types is not None:
        unknown = sorted(set(types) - set(_SYMBOL))
        if unknown:
            raise HFConversionError(f"mtp_layers_block_type: unsupported layer types {unknown}")
        from_types = "".join(_SYMBOL[t] for t in types)
    if text is None:
        if from_types is None:  # as Megatron-Bridge: no default block
            raise HFConversionError(f"num_nextn_predict_layers={blocks}: needs "
                                    "mtp_hybrid_override_pattern or mtp_layers_block_type")
        text = from_types
    elif from_types is not None and from_types != text:
        raise HFConversionError(f"mtp_layers_block_type={types!r} disagrees with "
                                f"mtp_hybrid_override_pattern={text!r}")
    if text not in MTP_DEPTHS:
        raise HFConversionError(f"mtp_hybrid_override_pattern={text!r}: hymoe's MTP block is one "
                                f"transformer layer, one of {', '.join(MTP_DEPTHS)}")
    # Megatron-Bridge's default: a single block is a repeated layer unless the config says not.
    shared = bool(hf.get("mtp_use_repeated_layer", blocks == 1))
    if shared and blocks != 1:
        raise HFConversionError(f"mtp_use_repeated_layer=True: needs num_nextn_predict_layers=1, "
                                f"got {blocks}")
    n = int(depths or hf.get("mtp_num_layers") or blocks)
    if not shared and n != blocks:
        field = "mtp_depths" if depths else "mtp_num_layers"
        raise HFConversionError(f"{field}={n}: {blocks} independent MTP blocks "
                                f"(mtp_use_repeated_layer=False) run {blocks} depths")
    return (MTP + text) * n, shared, scale


def model_config_from_hf(hf: dict, name: str = "hf",
                         mtp_depths: Optional[int] = None) -> tuple[ModelConfig, int]:
    """(ModelConfig, vocab_size) from a ``nemotron_h`` config.json dict; refuses what megatron-core
    computes differently (see the module docstring). ``mtp_depths``: how many depths a shared MTP
    block runs (default: the config's ``mtp_num_layers``, else one per block)."""
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
    mtp_pattern, mtp_shared, mtp_scale = _mtp_from_hf(hf, mtp_depths)
    if MOE in pattern + mtp_pattern:
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
        pattern=pattern + mtp_pattern,
        mtp_shared_layer=mtp_shared,
        mtp_loss_scale=mtp_scale,
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


# to_hf of a model needs its ModelConfig; a model built elsewhere than build_single_process does not
# carry one, so it is read back from megatron's TransformerConfig and the module tree.
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
    mtp = getattr(model, "mtp", None)
    if mtp is not None:
        from hymoe.model.mtp import SharedLayerMTPBlock

        depth = ATTENTION + (MOE if hasattr(mtp.layers[0].transformer_layer.mlp, "router") else MLP)
        kw.update(pattern=kw["pattern"] + (MTP + depth) * model.mtp_depths,
                  mtp_shared_layer=isinstance(mtp, SharedLayerMTPBlock),
                  mtp_loss_scale=tc.mtp_loss_scaling_factor)
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


__all__ = ["hf_config", "model_config_from_hf", "model_config_of", "mtp_blocks", "HF_LAYER_TYPE",
           "HFConversionError"]
