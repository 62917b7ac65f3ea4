"""RMSNorm that megatron-core can use without apex or Transformer Engine, also under sequence parallel.

megatron-core's ``WrappedTorchNorm`` refuses sequence parallel, and MoE with TP > 1 requires it. The
math of a norm is per token, so sequence parallel only changes one thing: each TP rank sees a
different slice of tokens, so the weight gradient must be summed over the TP group. megatron-core does
that for every parameter marked ``sequence_parallel`` (in ``finalize_model_grads``), so marking the
weight is all this class adds.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """y = x / rms(x) * weight, statistics in fp32. x: [s, b, h] any float dtype → same dtype."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)
