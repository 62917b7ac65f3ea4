"""Context parallelism: the sequence split over ``cp`` ranks, and attention across the split.

Layout (megatron-core's, so checkpoints, schedules and the Mamba all-to-all agree): the sequence is
cut into 2·cp equal chunks and rank r holds chunks r and 2·cp−1−r. Under a causal mask the early
chunks attend to little and the late ones to much, so pairing them gives every rank the same work.

Mamba-2 layers use megatron-core's ``MambaContextParallel`` (an all-to-all from sequence-sharded
to head-sharded and back, see ``hymoe.model.mamba_mixer``); attention uses
``SDPAttention`` below, which needs neither Transformer Engine nor a GPU: each rank
gathers the keys and values of the whole sequence and attends with its own queries under a mask
built from global positions. The gather costs O(S) memory per rank for K and V — the same order
as the hidden states of one layer — and is exact; TE's ring attention replaces it on GPUs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule


def chunk_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions of the tokens that rank ``rank`` of ``cp`` holds, in its local order."""
    if cp == 1:
        return torch.arange(seq_len, device=device)
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2·cp = {2 * cp}")
    c = seq_len // (2 * cp)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([first, second])


def cp_size_rank() -> tuple[int, int]:
    if not parallel_state.model_parallel_is_initialized():
        return 1, 0
    return (parallel_state.get_context_parallel_world_size(),
            parallel_state.get_context_parallel_rank())


def shard_sequence(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This CP rank's part of a tensor holding the whole sequence along ``dim`` (tokens, labels,
    loss masks: ``[b, S]``)."""
    cp, rank = cp_size_rank()
    if cp == 1:
        return t
    idx = chunk_positions(t.shape[dim], cp, rank, device=t.device)
    return t.index_select(dim, idx)


def attention_mask(seq_len: int, seq_idx: Optional[torch.Tensor] = None, device=None):
    """Boolean mask, True where attention is NOT allowed (megatron's convention), for this CP
    rank's queries against the keys of all ranks in gathered order: ``[b|1, 1, S/cp, S]``.

    Causal by global position; with ``seq_idx`` (int ``[b, S]``, document index per token, whole
    sequence) also confined to the query's own document. ``None`` when cp = 1 and no documents:
    the attention kernel's own causal mask is then used."""
    cp, rank = cp_size_rank()
    if cp == 1 and seq_idx is None:
        return None
    device = seq_idx.device if seq_idx is not None else device
    q_pos = chunk_positions(seq_len, cp, rank, device=device)
    k_pos = torch.cat([chunk_positions(seq_len, cp, r, device=device) for r in range(cp)])
    allowed = k_pos[None, :] <= q_pos[:, None]  # [Sq, S]
    allowed = allowed[None]
    if seq_idx is not None:
        allowed = allowed & (seq_idx[:, q_pos, None] == seq_idx[:, None, k_pos])
    return ~allowed[:, None]


class SDPAttention(MegatronModule):
    """Core attention (megatron-core's ``core_attention`` slot) without Transformer Engine, at any
    cp: queries ``[Sq, b, heads, d]`` of this rank, keys/values gathered over the CP group when
    cp > 1 (the gather's backward reduce-scatters their gradients), GQA, PyTorch's
    ``scaled_dot_product_attention``. On CPU that is a flash kernel: memory O(S) with the causal
    mask, where megatron-core's local ``DotProductAttention`` materialises every score (4 GB per
    layer for four heads at 16k tokens) and refuses cp > 1. A mask, when needed, comes from
    ``attention_mask`` (``HybridModel`` builds it once per forward for every layer)."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        self.cp_group = pg_collection.cp if pg_collection is not None else (
            parallel_state.get_context_parallel_group())
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None
        if self.cp_group.size() > 1:
            key = gather_from_sequence_parallel_region(key, group=self.cp_group)
            value = gather_from_sequence_parallel_region(value, group=self.cp_group)
        sq, b, heads, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        if attention_mask is None:  # cp = 1, one causal stream per row
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=True,
                dropout_p=self.dropout if self.training else 0.0,
            )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=~attention_mask, scale=self.softmax_scale, enable_gqa=True,
                dropout_p=self.dropout if self.training else 0.0,
            )
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * d)
