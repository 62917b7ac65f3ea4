"""Build this rank's model chunks: the hybrid model for its pipeline stage, wrapped in megatron-core's
DistributedDataParallel (gradient buckets, DP all-reduce or reduce-scatter for the distributed
optimizer), with megatron-core's gradient finalisation (TP/SP norm grads, embedding ties, MoE
expert-bias updates) wired in."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)

from hymoe.model.build import build_model, build_transformer_config
from hymoe.model.config import ModelConfig
from hymoe.parallel.layout import ParallelConfig
from hymoe.parallel.setup import device


def build_model_chunks(
    model_cfg: ModelConfig,
    layout: ParallelConfig,
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
    transform=None,
    recompute: str = "none",
    recompute_modules=("core_attn",),
):
    """Returns ([DDP-wrapped model chunk], TransformerConfig): one chunk, or with virtual pipeline
    stages (``layout.vpp``) one per virtual stage of this rank, in order. ``transform(model,
    config)`` runs on each before wrapping (the precision layer swaps linear layers there).
    ``recompute``: none, selective (megatron-core's, ``recompute_modules``) or full (hymoe's, every
    layer: ``HybridStack``)."""
    selective = {}
    if recompute == "selective":
        selective = dict(recompute_granularity="selective", recompute_modules=list(recompute_modules))
    config = build_transformer_config(
        model_cfg,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        # Interleaved, one exchange sends an activation forward and a gradient back; at pp=2 both
        # go to the same rank, and megatron's batched exchange posts them in the opposite order to
        # that rank's receives, so an activation lands in a gradient's buffer (seen on gloo). Its
        # unbatched exchange orders them by rank parity (Megatron-LM's default with vpp).
        batch_p2p_comm=layout.vpp == 1,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.use_sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        moe_token_dispatcher_type=layout.moe_dispatcher,
        calculate_per_token_loss=True,
        **selective,
    )
    # megatron-core's full recompute is not in its Mamba stack (it ignores the setting); hymoe's
    # HybridStack reads this instead.
    config.hymoe_recompute_full = recompute == "full"
    # megatron-core sizes its process-wide MoE aux-loss tracker for the first model it sees.
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()
    stages = [None] if layout.vpp == 1 else list(range(layout.vpp))
    chunks = [_wrapped_chunk(model_cfg, config, layout, vocab_size, transform, vp_stage)
              for vp_stage in stages]
    config.finalize_model_grads_func = finalize_model_grads
    return chunks, config


def _wrapped_chunk(model_cfg, config, layout, vocab_size, transform, vp_stage):
    model = build_model(
        model_cfg,
        config,
        vocab_size=vocab_size,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
    )
    if transform is not None:
        transform(model, config)
    # Expert weights always take megatron's expert-parallel path (their own optimizer and gradient
    # buffers), also at ep=1 where megatron would treat them as dense. At ep=1 the expert
    # data-parallel group is the data-parallel group, so the math is unchanged — but the optimizer
    # (a chain of dense + expert optimizers) and so its checkpoint have the same structure at every
    # ep, which is what lets a checkpoint saved at one ep resume at another.
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False
    model.to(device())
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=layout.distributed_optimizer,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    ddp.broadcast_params()
    return ddp
