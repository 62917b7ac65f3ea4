"""Worker for tests/test_hf_checkpoint.py (run by torchrun with 2 processes): builds a LatentMoE
hybrid with 2 independent MTP depths under TP=2 × EP=2 (sequence parallel on), gives its small
weights distinct values, saves a megatron dist-checkpoint and the logits and per-depth MTP losses
of fixed tokens computed by the parallel model itself.

    torchrun --nproc_per_node=2 hf_convert_worker.py WORKDIR
"""

import os
import sys

import torch
import torch.distributed as dist

from hymoe.model.config import ModelConfig
from hymoe.parallel.layout import ParallelConfig
from hymoe.parallel.setup import init_distributed, initialize_model_parallel
from hymoe.train.checkpoint import save_model_weights
from hymoe.train.model_setup import build_model_chunks

VOCAB = 128
MODEL = ModelConfig(
    pattern="ME*E/*E/*E", hidden_size=64, num_attention_heads=4, num_query_groups=2, head_dim=16,
    mamba_num_heads=8, mamba_head_dim=16, mamba_state_dim=16, mamba_num_groups=2,
    mamba_chunk_size=16, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
    moe_shared_expert_intermediate_size=48, moe_latent_size=24,
)
LAYOUT = ParallelConfig(tp=2, ep=2)


def main():
    workdir = sys.argv[1]
    init_distributed()
    initialize_model_parallel(LAYOUT, seed=5)
    from megatron.core import parallel_state

    chunks, _ = build_model_chunks(MODEL, LAYOUT, VOCAB)
    model = chunks[0].module
    gen = torch.Generator().manual_seed(3)  # the same draws on both ranks: replicas stay equal
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))
    save_model_weights(chunks, os.path.join(workdir, "ckpt"))
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
    model.eval()
    with torch.no_grad():
        local = model(tokens, None, None)  # [b, s, vocab / tp]: the output layer is vocab-parallel
        # With labels the MTP depths run; their loss sums land in mtp_report (the same on both
        # ranks: the vocab-parallel cross entropy gives each rank every token's loss).
        labels = torch.roll(tokens, -1, dims=1)
        model(tokens, None, None, labels=labels)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, local.contiguous(), group=tp_group)
    if dist.get_rank() == 0:
        torch.save({"tokens": tokens, "logits": torch.cat(parts, dim=-1), "labels": labels,
                    "mtp_report": model.mtp_report.clone()}, os.path.join(workdir, "logits.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
