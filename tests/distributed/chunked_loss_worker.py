"""Worker for tests/test_chunked_loss.py (torchrun, 2 processes over gloo): the tiny hybrid at
tp=2 with sequence parallelism (the output layer all-gathers the sequence), per-token loss and
every local gradient shard with ``loss_chunk_tokens`` off and on (chunks that do not divide the
sequence). Writes <workdir>/rank<r>.json: {"loss_err", "grad_err": {name: relative error}}."""

import json
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from hymoe.model.build import build_model, build_transformer_config  # noqa: E402
from hymoe.model.config import ModelConfig  # noqa: E402
from hymoe.parallel.layout import ParallelConfig  # noqa: E402
from hymoe.parallel.setup import init_distributed, initialize_model_parallel  # noqa: E402

VOCAB, B, S = 512, 2, 48


def run(model, tokens, labels, chunk):
    model.config.hymoe_loss_chunk_tokens = chunk
    model.zero_grad(set_to_none=True)
    loss = model(tokens, None, None, labels=labels)
    loss.sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def main():
    work = sys.argv[1]
    init_distributed()
    initialize_model_parallel(ParallelConfig(tp=2, sequence_parallel=True), seed=5)
    cfg = ModelConfig(pattern="M*EM-E", mamba_chunk_size=16)
    tconfig = build_transformer_config(cfg, params_dtype=torch.float32, tensor_model_parallel_size=2,
                                       sequence_parallel=True)
    model = build_model(cfg, tconfig, vocab_size=VOCAB)
    g = torch.Generator().manual_seed(3)
    data = torch.randint(2, VOCAB, (B, S + 1), generator=g)  # the same on both ranks
    ref_loss, ref_grads = run(model, data[:, :-1], data[:, 1:], 0)
    # 2 rows × 5 local positions × 2 ranks = 20 tokens per chunk; 24 local positions: 5 chunks.
    loss, grads = run(model, data[:, :-1], data[:, 1:], 20)
    out = {
        "loss_shape": list(loss.shape),
        "loss_err": float((loss - ref_loss).abs().max() / ref_loss.abs().max()),
        "grad_err": {n: float((grads[n] - r).abs().max() / r.abs().max().clamp_min(1e-30))
                     for n, r in ref_grads.items()},
        "missing": sorted(set(ref_grads) ^ set(grads)),
    }
    with open(f"{work}/rank{dist.get_rank()}.json", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
