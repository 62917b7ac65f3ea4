"""Validation loss during training (``train.eval_interval``): held-out data, forward only.

Every validation reads the same ``train.eval_iters`` global batches of ``data.valid_path`` (the
stream is reset to its start each time), so one run's values compare across steps and two runs'
values compare with each other — the BF16 and NVFP4 arms of a comparison see the same tokens. The
loss is the token mean over those batches, reduced over data-parallel ranks as the training loss
is, through megatron-core's pipeline schedule with ``forward_only``.

Validation leaves training as it was: the model is back in training mode afterwards, the MTP and
MoE bookkeeping that a forward adds to is emptied, and no random draw is taken (dropout is off in
eval mode; NVFP4's stochastic rounding and Hadamard signs belong to the backward).
"""

from __future__ import annotations

import math
import time

import torch

from hymoe.data import DataError
from hymoe.data.loader import PackedStream


class Validator:
    def __init__(self, cfg, dp_rank: int, dp_size: int, tokenizer_fingerprint: str):
        t, d = cfg.train, cfg.data
        try:
            self.stream = PackedStream(
                d.valid_path, t.seq_len, t.micro_batch, dp_rank, dp_size, seed=0,
                tokenizer_fingerprint=tokenizer_fingerprint,
                shard_prefetch_threads=d.shard_prefetch_threads, on_corrupt=d.on_corrupt,
                eod_mask_loss=d.eod_mask_loss)
        except DataError as e:
            raise DataError(f"data.valid_path: {e}") from None
        self.start = self.stream.state_dict()
        self.iters, self.document_masks = t.eval_iters, t.document_masks
        self.seq_len, self.micro_batch = t.seq_len, t.micro_batch

    def run(self, chunks, num_microbatches: int) -> dict:
        """{"val/loss", "val/ppl", "val/tokens", "val/time_s"}: the same on every rank."""
        from hymoe.train.step import clear_step_bookkeeping, run_schedule

        t0 = time.perf_counter()
        self.stream.load_state_dict(self.start)
        for c in chunks:
            c.eval()
        loss_sum, tokens = 0.0, 0
        try:
            with torch.no_grad():
                for _ in range(self.iters):
                    loss, n = run_schedule(chunks, self.stream, num_microbatches, self.seq_len,
                                           self.micro_batch, self.document_masks, forward_only=True)
                    loss_sum, tokens = loss_sum + loss * n, tokens + n
        finally:
            for c in chunks:
                c.train()
            clear_step_bookkeeping(chunks)
        loss = loss_sum / max(tokens, 1)
        return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)), "val/tokens": tokens,
                "val/time_s": time.perf_counter() - t0}

    def close(self) -> None:
        self.stream.close()
