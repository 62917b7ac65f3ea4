"""Model FLOPs per token, from the config alone: the numerator of MFU and the planner's step-time
estimate. One function (``flops_per_token``) that both call.

Conventions (those of Megatron-LM's ``num_floating_point_operations``, so MFU numbers compare):
- a GEMM [m, k] × [k, n] is 2·m·k·n; norms, activations, softmax, routing top-k, the depthwise
  conv and the embedding lookup are left out (each is under 1% at Nemotron sizes);
- attention scores and values cost 2·2·head_dim per query head per attended key, and a causal
  token attends to seq_len/2 keys on average;
- the Mamba-2 scan costs 7·d_inner·d_state per token (state decay, input, read-out: the
  recurrent form's operation count, which the chunked SSD algorithm matches up to lower-order
  terms);
- MoE counts the router, the top-k routed experts (at the latent width with LatentMoE, plus its
  two projections) and the shared expert: active FLOPs, not the experts a token skips;
- training = 3 × forward (backward = 2 × forward); activation recomputation is not model FLOPs.
MTP (``mtp_depths`` > 0): each depth runs its ``mtp_pattern`` layers, its 2h → h input projection
and the shared output head once more per token.
"""

from __future__ import annotations

from hymoe.model.config import ModelConfig
from hymoe.model.pattern import ATTENTION, MAMBA, MLP, MOE

SSD_SCAN_FLOPS_PER_STATE = 7


def layer_flops(cfg: ModelConfig, symbol: str, seq_len: int) -> float:
    """Forward FLOPs per token of one layer of type ``symbol`` at sequence length ``seq_len``."""
    h = cfg.hidden_size
    if symbol == MAMBA:
        d_inner = cfg.mamba_num_heads * cfg.mamba_head_dim
        in_proj = 2 * h * (2 * d_inner + 2 * cfg.mamba_num_groups * cfg.mamba_state_dim
                           + cfg.mamba_num_heads)
        scan = SSD_SCAN_FLOPS_PER_STATE * d_inner * cfg.mamba_state_dim
        out_proj = 2 * d_inner * h
        return in_proj + scan + out_proj
    if symbol == ATTENTION:
        q = cfg.num_attention_heads * cfg.head_dim
        kv = 2 * cfg.num_query_groups * cfg.head_dim
        projections = 2 * h * (q + kv) + 2 * q * h
        core = 2 * 2 * q * (seq_len / 2)  # QKᵀ and AV over seq_len/2 keys on average (causal)
        return projections + core
    if symbol == MLP:
        return 2 * 2 * h * cfg.ffn_hidden_size
    if symbol == MOE:
        width = cfg.moe_latent_size or h
        router = 2 * h * cfg.num_experts
        routed = cfg.moe_router_topk * 2 * 2 * width * cfg.moe_ffn_hidden_size
        latent = 2 * 2 * h * cfg.moe_latent_size if cfg.moe_latent_size else 0
        shared = 2 * 2 * h * (cfg.moe_shared_expert_intermediate_size or 0)
        return router + routed + latent + shared
    raise ValueError(f"unknown layer symbol {symbol!r}")


def flops_breakdown(cfg: ModelConfig, seq_len: int, vocab_size: int | None = None,
                    mtp_depths: int = 0, mtp_pattern: str = "*E") -> dict[str, float]:
    """Forward FLOPs per token by component: one entry per layer type (``M``, ``*``, ``E``, ``-``),
    ``logits``, ``mtp`` and ``total``."""
    vocab = vocab_size or cfg.vocab_size
    if not vocab:
        raise ValueError("vocab_size: unknown (model.vocab_size is null); pass vocab_size=")
    out: dict[str, float] = {}
    for s in cfg.layer_pattern:
        out[s] = out.get(s, 0.0) + layer_flops(cfg, s, seq_len)
    logits = 2.0 * cfg.hidden_size * vocab
    out["logits"] = logits
    per_depth = (2 * 2 * cfg.hidden_size * cfg.hidden_size  # eh_proj: [h_emb; h] → h
                 + sum(layer_flops(cfg, s, seq_len) for s in mtp_pattern) + logits)
    out["mtp"] = mtp_depths * per_depth
    out["total"] = sum(out.values())
    return out


def flops_per_token(cfg: ModelConfig, seq_len: int, vocab_size: int | None = None,
                    mtp_depths: int = 0, mtp_pattern: str = "*E", training: bool = True) -> float:
    """Model FLOPs per token: forward, or forward + backward (3×) with ``training``.
    MFU = tokens/s · flops_per_token / peak FLOP/s."""
    fwd = flops_breakdown(cfg, seq_len, vocab_size, mtp_depths, mtp_pattern)["total"]
    return 3.0 * fwd if training else fwd


def layer_flops_by_module(cfg: ModelConfig, symbol: str, seq_len: int) -> dict[str, float]:
    """``layer_flops`` split by the module that spends it, keyed by megatron-core's module name
    inside the layer (``mixer.in_proj``, ``mlp.experts.linear_fc1``, …; ``mixer.scan`` and
    ``self_attention.core_attention`` for the parts that are not weight GEMMs). The planner needs
    the split because each module runs in its own precision. Sums to ``layer_flops``."""
    h = cfg.hidden_size
    if symbol == MAMBA:
        d_inner = cfg.mamba_num_heads * cfg.mamba_head_dim
        return {
            "mixer.in_proj": 2 * h * (2 * d_inner + 2 * cfg.mamba_num_groups * cfg.mamba_state_dim
                                      + cfg.mamba_num_heads),
            "mixer.scan": SSD_SCAN_FLOPS_PER_STATE * d_inner * cfg.mamba_state_dim,
            "mixer.out_proj": 2 * d_inner * h,
        }
    if symbol == ATTENTION:
        q = cfg.num_attention_heads * cfg.head_dim
        kv = 2 * cfg.num_query_groups * cfg.head_dim
        return {
            "self_attention.linear_qkv": 2 * h * (q + kv),
            "self_attention.core_attention": 2 * 2 * q * (seq_len / 2),
            "self_attention.linear_proj": 2 * q * h,
        }
    if symbol == MLP:
        return {"mlp.linear_fc1": 2 * h * cfg.ffn_hidden_size,
                "mlp.linear_fc2": 2 * h * cfg.ffn_hidden_size}
    if symbol == MOE:
        width = cfg.moe_latent_size or h
        routed = cfg.moe_router_topk * 2 * width * cfg.moe_ffn_hidden_size
        shared = 2 * h * (cfg.moe_shared_expert_intermediate_size or 0)
        out = {"mlp.router": 2 * h * cfg.num_experts,
               "mlp.experts.linear_fc1": routed, "mlp.experts.linear_fc2": routed,
               "mlp.shared_experts.linear_fc1": shared, "mlp.shared_experts.linear_fc2": shared}
        if cfg.moe_latent_size:
            out["mlp.fc1_latent_proj"] = out["mlp.fc2_latent_proj"] = 2 * h * cfg.moe_latent_size
        return out
    raise ValueError(f"unknown layer symbol {symbol!r}")
