"""Output layer + cross-entropy in sequence chunks, so the logits of a long sequence are never held
at once (``model.loss_chunk_tokens``).

Why: the logits are tokens × vocabulary. At 1M tokens and Nemotron 3's 131,072-token vocabulary
that is 512 GiB in fp32 for one sequence (divided by cp and tp), and megatron-core's
cross-entropy keeps a softmax of the same size for its backward — far more than the model's
weights or its per-layer activations. Here the sequence is cut into chunks; each chunk runs the
model's own output layer and ``compute_language_model_loss`` under activation checkpointing
(``torch.utils.checkpoint``, non-reentrant), so its logits are dropped as soon as its loss is
known and recomputed in the backward. Peak: one chunk's logits, softmax and logit gradient.
Cost: the output GEMM runs once more (+1/3 of the output layer's FLOPs).

Exact: every token's loss is computed from the same row of the same GEMM; the weight gradient is
a sum over chunks instead of one GEMM (equal up to summation order).

Sequence parallelism (tp > 1): the hidden states are split along the sequence over the TP ranks
and the output layer all-gathers them. Chunk c of each rank's share is gathered into rows
[rank 0's chunk c, rank 1's chunk c, …], so the labels of those rows are picked in that order
and the per-token losses are put back in sequence order at the end.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint


def _chunk_loss(hidden: torch.Tensor, labels: torch.Tensor, *, model, weight) -> torch.Tensor:
    logits, _ = model.output_layer(hidden, weight=weight)
    return model.compute_language_model_loss(labels, logits)


def chunk_columns(local_len: int, tp: int, start: int, stop: int) -> torch.Tensor:
    """Sequence positions (of the tp·local_len gathered ones) of the rows that the output layer
    produces for local rows [start, stop) under sequence parallelism: int64 [tp·(stop−start)]."""
    offsets = torch.arange(tp, dtype=torch.long)[:, None] * local_len
    return (offsets + torch.arange(start, stop, dtype=torch.long)[None]).reshape(-1)


def chunked_language_model_loss(model, hidden: torch.Tensor, labels: torch.Tensor,
                                chunk_tokens: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token loss fp32 [b, S] of ``model.output_layer`` + ``model.compute_language_model_loss``
    (a megatron-core ``LanguageModule``), with at most ``chunk_tokens`` tokens' logits at once.

    hidden: [s, b, h], this rank's part of the sequence (s = S / tp under sequence parallelism);
    labels: int [b, S]; weight: the output weight when it is tied to the embedding, else None.
    """
    s, b = hidden.shape[0], hidden.shape[1]
    layer = model.output_layer
    tp = 1
    if getattr(layer, "sequence_parallel", False):
        tp = dist.get_world_size(model.pg_collection.tp)
    if labels.shape[1] != s * tp:
        raise ValueError(f"labels cover {labels.shape[1]} positions, hidden states {s}·tp={s * tp}")
    # Rows per chunk on this rank: the gathered chunk holds tp·rows·b tokens.
    rows = max(1, chunk_tokens // (b * tp))
    fn = partial(_chunk_loss, model=model, weight=weight)
    if rows >= s:
        return fn(hidden, labels)
    losses, columns = [], []
    for start in range(0, s, rows):
        stop = min(s, start + rows)
        cols = chunk_columns(s, tp, start, stop).to(labels.device)
        columns.append(cols)
        # No randomness in the output layer or the loss: no RNG state to stash and restore.
        losses.append(checkpoint(fn, hidden[start:stop], labels.index_select(1, cols),
                                 use_reentrant=False, preserve_rng_state=False))
    loss = torch.cat(losses, dim=1)
    if tp > 1:  # back into sequence order
        loss = loss.index_select(1, torch.argsort(torch.cat(columns)))
    return loss
