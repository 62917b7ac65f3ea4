"""Worker for tests/test_recompute.py: the tiny hybrid MoE trained 3 steps (packed documents, two
microbatches per step) with activation recompute none, selective and full, from the same initial
weights; writes per-step losses, grad norms and the first step's gradients per parameter kind.
One process, or two with pp=2 (1F1B interleaves microbatches, so a layer's recomputation runs
after the next microbatch's forward)."""

import json
import os
import sys

import torch
import torch.distributed as dist

from equality_worker import SEQ, STEPS, VOCAB, batches, grad_norms_by_kind
from hymoe.model.config import ModelConfig
from hymoe.parallel.layout import ParallelConfig
from hymoe.parallel.setup import init_distributed, initialize_model_parallel
from hymoe.train.checkpoint import load_model_weights, save_model_weights
from hymoe.train.model_setup import build_model_chunks
from hymoe.train.optim import OptimConfig, build_optimizer, build_scheduler
from hymoe.train.step import train_step

MODEL = ModelConfig(pattern="M*E-M*E-", num_experts=4, moe_router_topk=2, moe_latent_size=32)
MODES = {"none": (), "selective": ("core_attn", "mlp", "moe", "shared_experts"), "full": ()}


def run(mode: str, layout: ParallelConfig, init_dir: str) -> list[dict]:
    from megatron.core import parallel_state

    initialize_model_parallel(layout, seed=1234)
    chunks, _ = build_model_chunks(MODEL, layout, VOCAB, recompute=mode, recompute_modules=MODES[mode])
    if mode == "none":
        save_model_weights(chunks, init_dir)
    else:
        load_model_weights(chunks, init_dir)
    opt_cfg = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.1, adam_eps=1e-5)
    optimizer = build_optimizer(opt_cfg, chunks, distributed=False, bf16=False)
    scheduler = build_scheduler(opt_cfg, optimizer, STEPS)
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    out = []
    saved = [0]

    def pack(t):  # tensors kept for the backward outside any recomputed region
        saved[0] += t.numel() * t.element_size()
        return t

    for step in range(STEPS):
        micro = batches(step, rank, dp)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            r = train_step(chunks, optimizer, scheduler, iter(micro), len(micro), SEQ, 1,
                           document_masks=True)
        out.append({"loss": r.loss, "grad_norm": r.grad_norm, **{k: v for k, v in r.extra.items()}})
        if step == 0:
            out[0]["grads"] = grad_norms_by_kind(chunks)
    out[0]["saved_bytes"] = saved[0]
    return out


def main():
    workdir = sys.argv[1]
    rank, world = init_distributed()
    layout = ParallelConfig(pp=world)
    init_dir = os.path.join(workdir, f"init_pp{world}")
    results = {mode: run(mode, layout, init_dir) for mode in MODES}
    if rank == 0:
        with open(os.path.join(workdir, f"recompute_pp{world}.json"), "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
