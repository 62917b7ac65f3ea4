"""Model configuration: the architecture knobs of a Nemotron-3-style hybrid, with names that map
one-to-one onto megatron-core's ``TransformerConfig`` (see ``to_transformer_kwargs``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hymoe.model.pattern import ATTENTION, MAMBA, MOE, PatternError, parse


class ModelConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    name: str = "tiny"
    # Layer pattern: M mamba, * attention, E moe, - mlp, | pipeline-stage boundary.
    pattern: str = "M*E-"
    hidden_size: int = 64
    # Vocabulary size; null takes it from the data's tokenizer (manifest.json).
    vocab_size: Optional[int] = None
    max_sequence_length: int = 4096
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    # Attention (GQA, no positional embedding: Nemotron 3 uses none).
    num_attention_heads: int = 4
    num_query_groups: int = 2
    head_dim: int = 16
    # Dense MLP ("-" layers), squared-ReLU, no gating.
    ffn_hidden_size: int = 128
    # Mamba-2 ("M" layers).
    mamba_num_heads: int = 8
    mamba_head_dim: int = 16
    mamba_state_dim: int = 16
    mamba_num_groups: int = 2
    mamba_chunk_size: int = 16
    # Lower clamp on dt after softplus. 0: none, as megatron-core (and Nemotron 3 training). HF
    # nemotron_h clamps at its time_step_min in prefill; hymoe.model.from_hf sets this to match.
    mamba_dt_min_clamp: float = 0.0
    # MoE ("E" layers): sigmoid router, normalised top-k, expert-bias balancing, shared expert.
    num_experts: int = 4
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int = 64
    moe_shared_expert_intermediate_size: Optional[int] = 64
    moe_router_topk_scaling_factor: Optional[float] = 2.5
    moe_router_enable_expert_bias: bool = True
    moe_router_bias_update_rate: float = 1e-3
    moe_aux_loss_coeff: float = 1e-4
    # LatentMoE (Nemotron 3 Super/Ultra): routed experts, dispatch and combine at this width;
    # router and shared expert stay at hidden_size. null: plain MoE.
    moe_latent_size: Optional[int] = None
    untie_embeddings_and_output_weights: bool = True
    # Multi-Token Prediction (depths come from the pattern's '/' parts): one layer shared by all
    # depths (Nemotron 3 Super) or one per depth; weight of the averaged MTP loss in the total.
    mtp_shared_layer: bool = False
    mtp_loss_scale: float = 0.3
    # Output layer + cross-entropy in chunks of at most this many tokens (sequence positions ×
    # micro-batch rows) per rank, each chunk's logits recomputed in the backward: a long sequence
    # never holds its full-vocabulary logits at once. Same losses and gradients. 0: off.
    loss_chunk_tokens: int = 0

    def validate(self) -> None:
        try:
            p = parse(self.pattern, "model.pattern")
        except PatternError as e:
            raise ModelConfigError(str(e)) from None

        def need(cond, field, msg):
            if not cond:
                raise ModelConfigError(f"model.{field}: {msg}")

        need(self.hidden_size > 0, "hidden_size", f"must be positive, got {self.hidden_size}")
        if p.count(ATTENTION):
            need(self.num_attention_heads > 0, "num_attention_heads", "must be positive")
            need(
                self.num_query_groups > 0 and self.num_attention_heads % self.num_query_groups == 0,
                "num_query_groups",
                f"{self.num_query_groups} must divide num_attention_heads={self.num_attention_heads}",
            )
        if p.count(MAMBA):
            need(
                self.mamba_num_heads % self.mamba_num_groups == 0,
                "mamba_num_groups",
                f"{self.mamba_num_groups} must divide mamba_num_heads={self.mamba_num_heads}",
            )
        if p.count(MOE):
            need(self.num_experts > 0, "num_experts", "the pattern has E layers; need experts > 0")
            need(
                0 < self.moe_router_topk <= self.num_experts,
                "moe_router_topk",
                f"{self.moe_router_topk} must be in 1..num_experts={self.num_experts}",
            )
            need(
                self.moe_latent_size is None or self.moe_latent_size > 0,
                "moe_latent_size",
                f"must be positive or null, got {self.moe_latent_size}",
            )
        need(
            self.vocab_size is None or self.vocab_size > 0, "vocab_size", "must be positive or null"
        )
        need(self.loss_chunk_tokens >= 0, "loss_chunk_tokens",
             f"must be ≥ 0 (0: off), got {self.loss_chunk_tokens}")

    @property
    def num_layers(self) -> int:
        return parse(self.pattern).num_layers

    @property
    def layer_pattern(self) -> str:
        return parse(self.pattern).layers

    @property
    def mtp_depths(self) -> tuple[str, ...]:
        return parse(self.pattern).mtp

    def to_transformer_kwargs(self) -> dict:
        """Architecture fields of megatron-core's TransformerConfig (no parallel/precision ones)."""
        from megatron.core.activations import squared_relu

        has_moe = MOE in self.layer_pattern or any(MOE in d for d in self.mtp_depths)
        kw = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.head_dim,
            ffn_hidden_size=self.ffn_hidden_size,
            normalization="RMSNorm",
            layernorm_epsilon=self.layernorm_epsilon,
            add_bias_linear=False,
            gated_linear_unit=False,
            activation_func=squared_relu,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.init_method_std,
            mamba_state_dim=self.mamba_state_dim,
            mamba_head_dim=self.mamba_head_dim,
            mamba_num_groups=self.mamba_num_groups,
            mamba_num_heads=self.mamba_num_heads,
        )
        if has_moe:
            kw.update(
                num_moe_experts=self.num_experts,
                moe_router_topk=self.moe_router_topk,
                moe_ffn_hidden_size=self.moe_ffn_hidden_size,
                moe_shared_expert_intermediate_size=self.moe_shared_expert_intermediate_size,
                moe_router_score_function="sigmoid",
                moe_router_pre_softmax=False,
                moe_router_topk_scaling_factor=self.moe_router_topk_scaling_factor,
                moe_router_enable_expert_bias=self.moe_router_enable_expert_bias,
                moe_router_bias_update_rate=self.moe_router_bias_update_rate,
                moe_router_load_balancing_type="seq_aux_loss",
                moe_aux_loss_coeff=self.moe_aux_loss_coeff,
                moe_router_dtype="fp32",
                moe_grouped_gemm=False,
                moe_latent_size=self.moe_latent_size,
            )
        if self.mtp_depths:
            kw.update(mtp_num_layers=len(self.mtp_depths), mtp_loss_scaling_factor=self.mtp_loss_scale)
        return kw
