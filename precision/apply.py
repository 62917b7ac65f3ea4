"""Precision as a model transform: give each megatron-core linear layer the format the policy picks.

Layers that stay in high precision are untouched. A quantized layer keeps its parameters, its
tensor-parallel sharding and megatron-core's communication; only the local GEMM is replaced by the
emulated quantized one (``emulated_linear.quantized_linear``). Works for column- and row-parallel
linears, including MoE experts and shared experts.
"""

from __future__ import annotations

import torch
from hymoe.precision import nvfp4
from hymoe.precision.config import PrecisionConfig
from hymoe.precision.emulated_linear import NVFP4Recipe, quantized_linear
from hymoe.precision.policy import decide, layer_index
from hymoe.precision.rng import StochasticRoundingRNG, derive_seed
from hymoe.precision.telemetry import Telemetry
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

_QUANTIZED = ("nvfp4", "mxfp8")


def _quantized_forward_impl(
    fmt: str,
    recipe: NVFP4Recipe,
    rng: StochasticRoundingRNG,
    name: str | None = None,
    telemetry: Telemetry | None = None,
):
    """A drop-in for megatron's ``linear_with_grad_accumulation_and_async_allreduce``: the same
    TP communication (sequence-parallel all-gather / dgrad all-reduce), then the emulated GEMM.

    Under TP every operand is quantized as the local GEMM sees it: a sharded weight (and a
    column-parallel dy, a row-parallel x) with its shard's own amax, a sequence-parallel input
    after the all-gather (i.e. with the TP group's amax) — what Transformer Engine does, see
    docs/precision.md ("Tensor parallelism").
    """

    def forward_impl(
        input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
        grad_output_buffer=None, wgrad_deferral_limit=None, async_grad_allreduce=None,
        tp_group=None,
    ):
        if sequence_parallel:
            input = gather_from_sequence_parallel_region(input, True, group=tp_group)
        elif allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        return quantized_linear(
            input, weight, fmt, recipe, rng.generator, bias=bias, name=name, telemetry=telemetry
        )

    return forward_impl


def linear_layers(model: torch.nn.Module):
    """(name, module) of every megatron linear layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            yield name, module


def plan(model: torch.nn.Module, cfg: PrecisionConfig, num_layers: int) -> list[tuple[str, str, str]]:
    """[(module name, format, reason)] for every linear layer of ``model`` (this PP stage)."""
    local_to_global = {}
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        local_to_global = {i: layer.layer_number - 1 for i, layer in enumerate(decoder.layers)}
    out = []
    for name, _ in linear_layers(model):
        fmt, why = decide(name, layer_index(name, local_to_global), num_layers, cfg)
        out.append((name, fmt, why))
    return out


def apply_precision(
    model,
    cfg: PrecisionConfig,
    dtype: torch.dtype,
    seed: int = 0,
    telemetry: Telemetry | None = None,
):
    """Swap the GEMM of every layer the policy quantizes; return the plan (for logging).

    telemetry: measures the quantized operands every N steps and names layers whose gradient
    quantized to all zeros (the trainer drives it: ``start_step``/``end_step``). Without one, a
    zeroed NVFP4 gradient is a hard error, as before.
    """
    import torch.distributed as dist
    from hymoe.parallel.setup import device

    report = plan(model, cfg, model.config.num_layers)
    if not any(fmt in _QUANTIZED for _, fmt, _ in report):
        return report
    nvfp4.set_compile(cfg.compile_quantizer)
    rank = dist.get_rank() if dist.is_initialized() else 0
    # The generator lives where the tensors are quantized (torch.rand needs the same device type).
    # A rank's model chunks (virtual pipeline stages) draw from distinct streams.
    chunk = getattr(model, "vp_stage", None) or 0
    rng = StochasticRoundingRNG(derive_seed(seed, chunk) if chunk else seed, rank=rank,
                                device=device())
    recipe = NVFP4Recipe(
        disable_rht=cfg.disable_rht,
        disable_stochastic_rounding=cfg.disable_stochastic_rounding,
        disable_2d_quantization=cfg.disable_2d_quantization,
    )
    modules = dict(linear_layers(model))
    for name, fmt, _ in report:
        if fmt in _QUANTIZED:
            modules[name]._forward_impl = _quantized_forward_impl(
                fmt, recipe, rng, name=name, telemetry=telemetry
            )
            modules[name].hymoe_format = fmt
    model.hymoe_sr_rng = rng  # checkpointed with the trainer's state
    return report
