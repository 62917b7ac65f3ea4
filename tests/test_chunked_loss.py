"""`model.loss_chunk_tokens`: the output layer + cross-entropy in sequence chunks gives the same
per-token losses and the same gradient for every parameter as megatron's unchunked loss (with and
without MTP depths, with document masks, chunks that do not divide the sequence), and its peak
memory is a fraction of the unchunked one when the logits dominate."""

import pytest
import torch

from hymoe.model import hf
from hymoe.model.chunked_loss import chunk_columns
from hymoe.model.config import ModelConfig

VOCAB = 384


def _model(pattern: str, vocab: int = VOCAB, seed: int = 7):
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()  # sized by the first model; this one may be deeper
    cfg = ModelConfig(pattern=pattern, mamba_chunk_size=16)
    torch.manual_seed(seed)
    return hf.build_single_process(cfg, vocab, seed=seed)


def _loss_and_grads(model, tokens, labels, chunk_tokens, seq_idx=None):
    model.config.hymoe_loss_chunk_tokens = chunk_tokens
    model.zero_grad(set_to_none=True)
    if model.mtp_report is not None:
        model.mtp_report.zero_()
    loss = model(tokens, None, None, labels=labels, seq_idx=seq_idx)
    loss.sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    if model.mtp_report is not None:  # the MTP depth's loss sum and tokens
        grads["mtp_report"] = model.mtp_report.clone()
    return loss.detach(), grads


@pytest.mark.parametrize("pattern, document_masks", [
    ("M*EM-E", False), ("M*EM-E", True), ("M*EM-E/*E", False),
])
def test_chunked_equals_unchunked(pattern, document_masks):
    model = _model(pattern)
    g = torch.Generator().manual_seed(1)
    b, s = 2, 64
    data = torch.randint(2, VOCAB, (b, s + 1), generator=g)
    tokens, labels = data[:, :-1], data[:, 1:]
    seq_idx = (torch.arange(s) >= 23).int().expand(b, s).contiguous() if document_masks else None
    ref_loss, ref_grads = _loss_and_grads(model, tokens, labels, 0, seq_idx)
    # 2 rows × 9 positions = 18 tokens per chunk; 64 positions → 8 chunks, the last one short.
    loss, grads = _loss_and_grads(model, tokens, labels, 18, seq_idx)
    assert loss.shape == (b, s)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert set(grads) == set(ref_grads)
    assert any("output_layer" in n for n in grads) and any("embedding" in n for n in grads)
    for name, ref in ref_grads.items():
        # Equal up to fp32 summation order (the weight gradient is summed over chunks): within
        # 1e-5 of the tensor's largest entry.
        err = (grads[name] - ref).abs().max()
        assert err <= 1e-5 * ref.abs().max(), (name, float(err), float(ref.abs().max()))
    if model.mtp_report is not None:
        assert any(n.startswith("mtp.") for n in grads) and grads["mtp_report"][0, 0] > 0


def test_sequence_parallel_rows_map_back_to_positions():
    """Under sequence parallelism (tp=2, 8 positions, 4 per rank) chunk [1, 3) of each rank is
    gathered as rows [rank 0: positions 1, 2 | rank 1: positions 5, 6]."""
    assert chunk_columns(4, 2, 1, 3).tolist() == [1, 2, 5, 6]
    cols = torch.cat([chunk_columns(4, 2, a, min(4, a + 3)) for a in range(0, 4, 3)])
    assert sorted(cols.tolist()) == list(range(8))  # every position exactly once


def _peak_bytes(fn) -> int:
    """Peak of the bytes that torch's CPU allocator holds while ``fn`` runs, above the start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_chunking_cuts_peak_memory():
    """1 × 2048 tokens, vocabulary 16,384: unchunked, the fp32 logits (128 MiB) dominate the peak;
    in chunks of 256 tokens they are 1/8 of that."""
    vocab, s = 16_384, 2048
    model = _model("M-", vocab=vocab)  # no attention: its s² scores would dominate instead
    g = torch.Generator().manual_seed(2)
    data = torch.randint(2, vocab, (1, s + 1), generator=g)

    def step(chunk):
        def run():
            model.config.hymoe_loss_chunk_tokens = chunk
            model(data[:, :-1], None, None, labels=data[:, 1:]).sum().backward()
        return run

    model.zero_grad(set_to_none=True)
    step(0)()  # grads exist in both measured runs
    full = _peak_bytes(step(0))
    chunked = _peak_bytes(step(256))
    logits = s * vocab * 4
    assert full > logits, full  # the logits (cross-entropy turns them into its softmax in place)
    # Measured: 160 MiB unchunked, 52 MiB chunked (the rest is the model's own activations).
    assert chunked < full / 2 and full - chunked > 0.6 * logits, (chunked, full)


@pytest.mark.distributed
def test_chunked_equals_unchunked_under_sequence_parallelism(tmp_path):
    """tp=2 with sequence parallelism: the output layer gathers each chunk from both ranks; the
    per-token losses and every rank's gradient shards equal the unchunked ones."""
    import json

    from helpers import REPO, torchrun

    torchrun(REPO / "tests" / "distributed" / "chunked_loss_worker.py", 2, str(tmp_path))
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["loss_shape"] == [2, 48] and not r["missing"]
        assert r["loss_err"] < 1e-6, r["loss_err"]
        assert "output_layer.weight" in r["grad_err"]
        worst = max(r["grad_err"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-5, (rank, worst)


def test_chunked_through_megatron_ddp():
    """As the trainer runs it: megatron's DistributedDataParallel, whose gradient hooks move each
    parameter's gradient into its fp32 buffer (main_grad) — also when the output weight's gradient
    arrives chunk by chunk from the recomputed graphs."""
    from megatron.core import parallel_state

    from hymoe.parallel.layout import ParallelConfig
    from hymoe.parallel.setup import init_distributed, initialize_model_parallel
    from hymoe.train.model_setup import build_model_chunks

    init_distributed()
    if not parallel_state.model_parallel_is_initialized():
        initialize_model_parallel(ParallelConfig(), seed=4)
    torch.manual_seed(4)
    [ddp], _ = build_model_chunks(ModelConfig(pattern="M*EM-E", mamba_chunk_size=16),
                                  ParallelConfig(), VOCAB)
    g = torch.Generator().manual_seed(5)
    data = torch.randint(2, VOCAB, (2, 49), generator=g)

    def main_grads(chunk):
        ddp.module.config.hymoe_loss_chunk_tokens = chunk
        ddp.zero_grad_buffer()
        ddp(data[:, :-1], None, None, labels=data[:, 1:]).sum().backward()
        return {n: p.main_grad.clone() for n, p in ddp.module.named_parameters()}

    ref, got = main_grads(0), main_grads(10)
    assert ref["output_layer.weight"].abs().max() > 0
    for name, r in ref.items():
        assert (got[name] - r).abs().max() <= 1e-5 * r.abs().max().clamp_min(1e-12), name
