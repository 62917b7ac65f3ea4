"""Build the hybrid model: megatron-core's MambaModel over hymoe's layer specs."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.utils.checkpoint
from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from hymoe.model.config import ModelConfig
from hymoe.model.norm import RMSNorm
from hymoe.model.pattern import MOE
from hymoe.model.mtp import HybridModel, mtp_transformer_layer_spec
from hymoe.model.specs import hybrid_stack_submodules
from hymoe.parallel.layout import chunk_layers


class HybridStack(MambaStack):
    """megatron-core's MambaStack with a final norm that needs no Transformer Engine, full
    activation recompute (``config.hymoe_recompute_full``), which megatron's Mamba stack lacks, and
    virtual pipeline stages (``vp_stage``: this model chunk's), which it refuses."""

    def __init__(self, config, submodules, *args, post_layer_norm: bool = True,
                 vp_stage: int | None = None, **kwargs):
        # Read by _select_layers_for_pipeline_parallel, which MambaStack's constructor calls.
        self.vp_stage = vp_stage
        if vp_stage is not None:
            submodules = _at_virtual_stage(submodules, vp_stage)
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = RMSNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
        if getattr(config, "hymoe_recompute_full", False):
            for layer in self.layers:
                layer.forward = _recomputed(layer, layer.forward)

    def _select_layers_for_pipeline_parallel(self, layer_type_list):
        """(first layer's index, layer types) of this chunk: equal virtual stages, placed as
        megatron's transformer layers number themselves (megatron-core 0.16.1's own selection
        asserts there is no virtual pipeline). hymoe never sets megatron's uneven first/last stage
        sizes, so equal stages are all there is."""
        vpp = self.config.virtual_pipeline_model_parallel_size or 1
        layers = chunk_layers(self.config.num_layers, self.pp_group.size(), vpp,
                              self.pp_group.rank(), self.vp_stage or 0)
        return layers.start, layer_type_list[layers.start:layers.stop]


def _at_virtual_stage(submodules: MambaStackSubmodules, vp_stage: int) -> MambaStackSubmodules:
    """The stack's layer specs for model chunk ``vp_stage``: megatron's transformer layers (``*``,
    ``-``, ``E``) derive their global layer number — hence checkpoint keys and MoE log slots — from
    it. ``MLPLayer``'s constructor does not pass ``vp_stage`` on, so ``-`` layers are built as the
    ``TransformerLayer`` that ``MLPLayer`` is (it adds nothing else)."""

    def staged(spec):
        if not (isinstance(spec, ModuleSpec) and issubclass(spec.module, TransformerLayer)):
            return spec  # Mamba layers take their offset from the stack
        module = TransformerLayer if spec.module is MLPLayer else spec.module
        return replace(spec, module=module, params=dict(spec.params or {}, vp_stage=vp_stage))

    return replace(submodules, attention_layer=staged(submodules.attention_layer),
                   mlp_layer=staged(submodules.mlp_layer), moe_layer=staged(submodules.moe_layer))


def _recomputed(layer, forward):
    """``forward`` keeping only the layer's inputs for the backward, which runs it again.

    The second run is bookkeeping-silent: megatron-core's MoE routers add their aux losses to a
    process-wide log and count tokens per expert for the expert-bias update in every forward, so
    the recomputation restores both afterwards (the math is the first run's, bit for bit). It also
    sees the first run's document boundaries (the Mamba mixer's ``seq_idx`` side channel), which
    a pipeline schedule may have moved on to another microbatch's by then."""

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        calls = []
        side = [(m, m.seq_idx) for m in layer.modules() if hasattr(m, "seq_idx")]

        def once_logged(*a, **k):
            calls.append(None)
            if len(calls) == 1:
                return forward(*a, **k)
            now = [(m, m.seq_idx) for m, _ in side]
            for m, seq_idx in side:
                m.seq_idx = seq_idx
            try:
                with _bookkeeping_restored(layer):
                    return forward(*a, **k)
            finally:
                for m, seq_idx in now:
                    m.seq_idx = seq_idx

        return torch.utils.checkpoint.checkpoint(once_logged, *args, use_reentrant=False, **kwargs)

    return run


@contextmanager
def _bookkeeping_restored(layer):
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    tracker = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
    counts = [(m, m.local_tokens_per_expert.clone()) for m in layer.modules()
              if isinstance(getattr(m, "local_tokens_per_expert", None), torch.Tensor)]
    try:
        yield
    finally:
        for k, values in tracker.items():
            get_moe_layer_wise_logging_tracker()[k]["values"].copy_(values)
        for m, c in counts:
            m.local_tokens_per_expert.copy_(c)


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
    # Read by HybridModel's loss (hymoe.model.chunked_loss); 0: megatron's unchunked loss.
    config.hymoe_loss_chunk_tokens = model.loss_chunk_tokens
    return config


def build_model(
    model: ModelConfig,
    config: TransformerConfig,
    vocab_size: int,
    pre_process: bool = True,
    post_process: bool = True,
    pg_collection=None,
    vp_stage: int | None = None,
) -> HybridModel:
    """The hybrid model for this pipeline stage (all of it when pp=1), on CPU in params_dtype;
    with virtual pipeline stages, model chunk ``vp_stage`` of this pipeline rank."""
    uses_moe = MOE in model.layer_pattern or any(MOE in d for d in model.mtp_depths)
    stack = hybrid_stack_submodules(model.num_experts if uses_moe else None)
    spec = ModuleSpec(module=HybridStack, submodules=stack,
                      params={} if vp_stage is None else {"vp_stage": vp_stage})
    kwargs = {"vp_stage": vp_stage}
    if pg_collection is not None:
        kwargs["pg_collection"] = pg_collection
    if model.mtp_depths:
        kwargs.update(mtp_layer_spec=mtp_transformer_layer_spec(stack, model.mtp_depths[0]),
                      mtp_depths=len(model.mtp_depths), mtp_shared_layer=model.mtp_shared_layer)
    hybrid = HybridModel(
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
    return hybrid
