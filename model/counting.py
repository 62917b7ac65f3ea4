"""Parameter counts and linear-layer names from the config alone (no model is built), so that
``hymoe model info`` and ``hymoe precision show`` answer instantly for a 550B recipe too.
Tests check both against the built megatron-core model."""

from __future__ import annotations

from hymoe.model.config import ModelConfig
from hymoe.model.pattern import ATTENTION, MAMBA, MLP, MOE


def layer_params(cfg: ModelConfig, symbol: str, active: bool = False) -> int:
    """Parameters of one layer of type ``symbol`` (with ``active``: only the routed top-k experts)."""
    h = cfg.hidden_size
    if symbol == MAMBA:
        d_inner = cfg.mamba_num_heads * cfg.mamba_head_dim
        bc = 2 * cfg.mamba_num_groups * cfg.mamba_state_dim
        conv_dim = d_inner + bc
        in_proj = h * (2 * d_inner + bc + cfg.mamba_num_heads)
        conv = conv_dim * 4 + conv_dim  # kernel 4, with bias
        per_head = 3 * cfg.mamba_num_heads  # A_log, D, dt_bias
        return h + in_proj + conv + per_head + d_inner + d_inner * h
    if symbol == ATTENTION:
        q = cfg.num_attention_heads * cfg.head_dim
        kv = 2 * cfg.num_query_groups * cfg.head_dim
        return h + h * (q + kv) + q * h
    if symbol == MLP:
        return h + 2 * h * cfg.ffn_hidden_size
    if symbol == MOE:
        experts = cfg.moe_router_topk if active else cfg.num_experts
        shared = 2 * h * (cfg.moe_shared_expert_intermediate_size or 0)
        # LatentMoE: routed experts at the latent width, plus the d→ℓ and ℓ→d projections.
        width = cfg.moe_latent_size or h
        latent = 2 * h * cfg.moe_latent_size if cfg.moe_latent_size else 0
        router = cfg.num_experts * h
        return h + router + experts * 2 * width * cfg.moe_ffn_hidden_size + shared + latent
    raise ValueError(symbol)


def count_params(cfg: ModelConfig, vocab_size: int, active: bool = False) -> dict:
    """{'embedding', 'output', 'layers', 'final_norm', 'total'} (and per-type layer totals)."""
    by_type: dict[str, int] = {}
    for s in cfg.layer_pattern:
        by_type[s] = by_type.get(s, 0) + layer_params(cfg, s, active)
    emb = vocab_size * cfg.hidden_size
    out = emb if cfg.untie_embeddings_and_output_weights else 0
    layers = sum(by_type.values())
    mtp = sum(mtp_layer_params(cfg, depth, active) for depth in _mtp_layers(cfg))
    return {
        "embedding": emb, "output": out, "final_norm": cfg.hidden_size, "layers": layers,
        "by_type": by_type, "mtp": mtp, "total": emb + out + cfg.hidden_size + layers + mtp,
    }


def _mtp_layers(cfg: ModelConfig) -> list[str]:
    """The MTP layers built: one per depth, or one shared by all (``mtp_shared_layer``)."""
    depths = cfg.mtp_depths
    return depths[:1] if cfg.mtp_shared_layer else list(depths)


def mtp_layer_params(cfg: ModelConfig, depth: str, active: bool = False) -> int:
    """One MTP layer (megatron-core's): norms of the embedding and of the hidden state, the 2h → h
    ``eh_proj``, one attention + MoE/MLP transformer layer, and its final norm. Published totals
    (Super's "120.6B") leave it out: ``total - mtp``."""
    h = cfg.hidden_size
    return 3 * h + 2 * h * h + sum(layer_params(cfg, s, active) for s in depth)


def linear_layer_names(cfg: ModelConfig) -> list[str]:
    """Module names of every linear layer, as megatron-core names them in the built model (pp=1)."""
    names = []
    for i, s in enumerate(cfg.layer_pattern):
        p = f"decoder.layers.{i}."
        if s == MAMBA:
            names += [p + "mixer.in_proj", p + "mixer.out_proj"]
        elif s == ATTENTION:
            names += [p + "self_attention.linear_qkv", p + "self_attention.linear_proj"]
        elif s == MLP:
            names += [p + "mlp.linear_fc1", p + "mlp.linear_fc2"]
        elif s == MOE:
            for e in range(cfg.num_experts):
                names += [p + f"mlp.experts.local_experts.{e}.linear_fc1",
                          p + f"mlp.experts.local_experts.{e}.linear_fc2"]
            if cfg.moe_shared_expert_intermediate_size:
                names += [p + "mlp.shared_experts.linear_fc1", p + "mlp.shared_experts.linear_fc2"]
    for k, depth in enumerate(_mtp_layers(cfg)):
        p = f"mtp.layers.{k}."
        names += [p + "eh_proj", p + "transformer_layer.self_attention.linear_qkv",
                  p + "transformer_layer.self_attention.linear_proj"]
        names += [n.replace("decoder.layers.0.", p + "transformer_layer.")
                  for n in linear_layer_names(_one_layer(cfg, depth[1])) if n.startswith("decoder.")]
    return names + ["output_layer"]


def _one_layer(cfg: ModelConfig, symbol: str) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, pattern=symbol)
