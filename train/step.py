"""One optimizer step through megatron-core's forward-backward schedule.

The loss is a per-token mean over the whole global batch (``calculate_per_token_loss``): each
microbatch returns its summed loss and token count, megatron-core divides gradients by the token
total across microbatches and data-parallel ranks. So the step is the same math for any
microbatch count, DP size or pipeline split — which is what the layout equality tests check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import itertools
import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func

from hymoe.parallel.context import shard_sequence
from hymoe.train import faults


@dataclass
class StepResult:
    loss: float  # token-mean LM loss over the global batch
    tokens: int  # loss tokens in the global batch
    grad_norm: float  # before clipping
    skipped: bool  # the optimizer refused the update (non-finite grads)
    extra: dict = field(default_factory=dict)  # e.g. MTP losses per depth


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, poison: bool = False):
    """output_tensor: per-token loss [b, s] from the model; loss_mask float [b, s]."""
    losses = output_tensor.float().reshape(-1)
    if poison:
        losses = losses * float("nan")
    mask = loss_mask.float().reshape(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm_loss": report}


def forward_step(data_iterator: Iterator[dict], model, poison: bool = False,
                 document_masks: bool = False):
    """megatron-core forward_step_func: every stage reads the same batch stream (the first stage
    needs tokens, the last needs labels and the mask). With ``document_masks`` the batch's
    ``seq_idx`` keeps packed documents apart (Mamba state resets, attention masked). Under
    context parallelism every CP rank reads the same batch and keeps its share of the tokens;
    ``seq_idx`` stays whole (the model needs the whole sequence's documents)."""
    batch = next(data_iterator)
    dev = next(model.parameters()).device
    tokens, labels, loss_mask = (
        shard_sequence(batch[k]).to(dev, non_blocking=True) for k in ("tokens", "labels", "loss_mask")
    )
    seq_idx = batch["seq_idx"].to(dev, non_blocking=True) if document_masks else None
    output = model(tokens, None, None, labels=labels, loss_mask=loss_mask, seq_idx=seq_idx)
    return output, partial(_loss_func, loss_mask, poison=poison)


def _reduce_loss(losses: list[dict]) -> tuple[float, int]:
    """Sum (loss, tokens) over microbatches and DP ranks; share the result from the last stage."""
    report = torch.zeros(2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and losses:
        report = torch.stack([m["lm_loss"].double().cpu() for m in losses]).sum(0)
    if torch.cuda.is_available():
        report = report.cuda()
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        dist.all_reduce(report, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp_group) > 1:
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(report, src=last, group=pp_group)
    loss_sum, tokens = report.tolist()
    return loss_sum / max(tokens, 1.0), int(tokens)


def guarded_optimizer_step(optimizer, loss: float) -> tuple[bool, float]:
    """megatron-core's optimizer step, except that a non-finite loss or gradient norm skips the
    update (megatron-core skips only on fp16 loss-scale overflow; with bf16/fp32 a NaN would be
    applied). All ranks agree: the loss and the norm are already reduced over the job."""
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm() or 0.0)
    if found_inf or not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return False, grad_norm
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if params and opt.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(
                params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    return bool(optimizer.step_with_ready_grads()), grad_norm


def train_step(
    model_chunks: list,
    optimizer,
    scheduler,
    data_iterator: Iterator[dict],
    num_microbatches: int,
    seq_len: int,
    micro_batch: int,
    step: int = 0,
    document_masks: bool = False,
) -> StepResult:
    """Zero grads, run ``num_microbatches`` forward/backward passes, clip, step, advance the LR.
    ``step`` (1-based, the step being taken) only matters for fault injection."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss, tokens = run_schedule(model_chunks, data_iterator, num_microbatches, seq_len, micro_batch,
                                document_masks, poison=faults.due("nan_loss", step))
    ok, grad_norm = guarded_optimizer_step(optimizer, loss)
    if ok and scheduler is not None:
        scheduler.step(increment=1)
    extra = _mtp_losses(model_chunks)
    extra.update(_moe_aux_losses(num_microbatches))
    return StepResult(loss=loss, tokens=tokens, grad_norm=grad_norm, skipped=not ok, extra=extra)


def run_schedule(model_chunks: list, data_iterator: Iterator[dict], num_microbatches: int,
                 seq_len: int, micro_batch: int, document_masks: bool = False,
                 forward_only: bool = False, poison: bool = False) -> tuple[float, int]:
    """``num_microbatches`` forward (and, unless ``forward_only``, backward) passes through
    megatron-core's schedule for this layout; (token-mean loss, tokens) over the DP group."""
    if len(model_chunks) > 1:
        # megatron's interleaved schedule reads each model chunk's microbatches from the chunk's
        # own iterator; every chunk sees the same ones (tee reads each from the stream once).
        data_iterator = list(itertools.tee(data_iterator, len(model_chunks)))
    losses = get_forward_backward_func()(
        forward_step_func=partial(forward_step, poison=poison, document_masks=document_masks),
        data_iterator=data_iterator,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_len,
        micro_batch_size=micro_batch,
        forward_only=forward_only,
    )
    return _reduce_loss(losses)


def clear_step_bookkeeping(model_chunks: list) -> None:
    """Empty what forwards add up for a step's report: the MTP losses and megatron-core's MoE
    aux-loss tracker (after a validation, which must not show in the next step's numbers)."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    for chunk in model_chunks:
        report = getattr(getattr(chunk, "module", chunk), "mtp_report", None)
        if report is not None:
            report.zero_()
    get_moe_layer_wise_logging_tracker().clear()


def _moe_aux_losses(num_microbatches: int) -> dict:
    """megatron-core's MoE routers add their auxiliary losses (unscaled) to a process-wide
    tracker, one slot per layer; report their mean over layers with entries and microbatches (this
    rank's view) and empty the tracker, which megatron would otherwise keep adding to."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    out = {}
    for name, entry in tracker.items():
        values = entry["values"]
        used = values[values != 0]
        if used.numel():
            out[f"moe/{name}"] = float(used.mean()) / num_microbatches
    tracker.clear()
    return out


def _mtp_losses(model_chunks) -> dict:
    """Token-mean MTP loss per depth over the global batch. The model accumulates it per microbatch
    on the last pipeline stage; like the LM loss, it is summed over DP there and sent to every
    stage, so that rank 0 (the first stage) logs it."""
    models = [getattr(chunk, "module", chunk) for chunk in model_chunks]
    depths = max((getattr(m, "mtp_depths", 0) for m in models), default=0)
    if not depths:
        return {}
    total = torch.zeros(depths, 2, dtype=torch.float64)
    for report in (getattr(m, "mtp_report", None) for m in models):
        if report is not None:
            total += report
            report.zero_()
    total = total.to("cuda" if torch.cuda.is_available() else "cpu")
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp_group) > 1:
        dist.broadcast(total, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=pp_group)
    return {f"mtp_loss/depth{k + 1}": float(s / max(n, 1.0)) for k, (s, n) in enumerate(total.tolist())}
