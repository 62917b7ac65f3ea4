"""Build the hybrid model: megatron-core's MambaModel over hymoe's layer specs."""

from __future__ import annotations

from megatron.core.ssm.mamba_block import MambaStack
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from hymoe.model.config import ModelConfig
from hymoe.model.norm import RMSNorm
from hymoe.model.pattern import MOE
from hymoe.model.mtp import HybridModel, mtp_transformer_layer_spec
from hymoe.model.specs import hybrid_stack_submodules


class HybridStack(MambaStack):
    """megatron-core's MambaStack with a final norm that needs no Transformer Engine."""

    def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = RMSNorm(config, config.hidden_size, eps=config.layernorm_epsilon)


def build_transformer_config(model: ModelConfig, **parallel_and_precision) -> TransformerConfig:
    """TransformerConfig from the model's architecture plus parallel/precision fields."""
    kw = model.to_transformer_kwargs()
    kw.update(
        use_cpu_initialization=True,
        perform_initialization=True,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    kw.update(parallel_and_precision)
    config = TransformerConfig(**kw)
    # Not TransformerConfig fields: the SSD chunk length and dt clamp the mixer reads.
    config.hymoe_mamba_chunk_size = model.mamba_chunk_size
    config.hymoe_mamba_dt_limit = (model.mamba_dt_min_clamp, float("inf"))
    return config


def build_model(
    model: ModelConfig,
    config: TransformerConfig,
    vocab_size: int,
    pre_process: bool = True,
    post_process: bool = True,
    pg_collection=None,
) -> HybridModel:
    """The hybrid model for this pipeline stage (all of it when pp=1), on CPU in params_dtype."""
    uses_moe = MOE in model.layer_pattern or any(MOE in d for d in model.mtp_depths)
    stack = hybrid_stack_submodules(model.num_experts if uses_moe else None)
    spec = ModuleSpec(module=HybridStack, submodules=stack)
    kwargs = {}
    if pg_collection is not None:
        kwargs["pg_collection"] = pg_collection
    if model.mtp_depths:
        kwargs.update(mtp_layer_spec=mtp_transformer_layer_spec(stack, model.mtp_depths[0]),
                      mtp_depths=len(model.mtp_depths), mtp_shared_layer=model.mtp_shared_layer)
    return HybridModel(
        config=config,
        mamba_stack_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=model.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        hybrid_override_pattern=model.layer_pattern,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type="none",
        **kwargs,
    )
