"""Worker for the layout-equality tests (run by torchrun; see tests/test_parallel_equality.py).

``reference``: one process builds the tiny hybrid MoE, saves its initial weights as a megatron
dist-checkpoint, trains 3 steps and writes per-step losses and grad norms.
``layouts``: several processes, for each layout in turn: set up megatron's groups, build the model,
load the same initial weights (megatron resharding them onto the layout), train the same 3 steps
on the same global batches, write the results. All fp32.
"""

import json
import os
import re
import sys

import torch
import torch.distributed as dist

from hymoe.model.config import ModelConfig
from hymoe.parallel.layout import ParallelConfig
from hymoe.parallel.setup import init_distributed, initialize_model_parallel
from hymoe.train.checkpoint import load_model_weights, save_model_weights
from hymoe.train.model_setup import build_model_chunks
from hymoe.train.optim import OptimConfig, build_optimizer, build_scheduler
from hymoe.train.step import train_step

STEPS, GLOBAL_BATCH, SEQ, VOCAB = 3, 4, 32, 256
MODEL = ModelConfig(pattern="M*E-", num_experts=4, moe_router_topk=2)
# The same stack with LatentMoE (experts at 32 < 64) plus two Multi-Token Prediction depths sharing
# one attention+MoE layer (Super's arrangement). Under pp the last stage holds a copy of the input
# embedding for MTP (hymoe.model.mtp), loaded from the same checkpoint entry as the first stage's.
MTP_MODEL = ModelConfig(pattern="M*E-/*E/*E", num_experts=4, moe_router_topk=2, mtp_shared_layer=True,
                        moe_latent_size=32)
LAYOUTS = {
    "tp2": ParallelConfig(tp=2),
    "ep2": ParallelConfig(ep=2, moe_dispatcher="alltoall"),
    "pp2": ParallelConfig(pp=2),
    # Interleaved: each rank holds 2 chunks of 1 layer (rank 0: layers 0 and 2, rank 1: 1 and 3).
    "pp2_vpp2": ParallelConfig(pp=2, vpp=2),
    "dp2_distopt": ParallelConfig(distributed_optimizer=True),
    "cp2": ParallelConfig(cp=2),
    # Four processes (run with `layouts4`): mixes of two axes.
    "tp2_ep2": ParallelConfig(tp=2, ep=2),
    "pp2_dp2": ParallelConfig(pp=2),
    "cp2_tp2": ParallelConfig(cp=2, tp=2),
}
# Layouts also run with packed documents (seq_idx: Mamba resets, attention masked per document).
DOC_LAYOUTS = ("cp2", "cp2_tp2")


def batches(step: int, dp_rank: int, dp_size: int):
    """The step's global batch (fixed random tokens, random document boundaries), this DP rank's
    share, one sequence per micro."""
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    starts = torch.rand(GLOBAL_BATCH, SEQ, generator=g) < 0.15
    seq_idx = torch.cumsum(starts.int(), dim=1)
    return [
        {"tokens": data[i, None, :-1], "labels": data[i, None, 1:], "loss_mask": torch.ones(1, SEQ),
         "seq_idx": seq_idx[i, None]}
        for i in range(dp_rank, GLOBAL_BATCH, dp_size)
    ]


def run(layout: ParallelConfig, init_dir: str, save_init: bool, model=MODEL, docs: bool = False) -> list[dict]:
    from megatron.core import parallel_state

    initialize_model_parallel(layout, seed=1234)
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    chunks, _ = build_model_chunks(model, layout, VOCAB)
    if save_init:
        save_model_weights(chunks, init_dir)
    else:
        load_model_weights(chunks, init_dir)
    # eps 1e-5, not 1e-8: Adam divides each gradient element by its own magnitude, so elements
    # near zero turn fp32 rounding (~1e-9) into weight differences of order lr, and three steps
    # would compare rounding luck instead of layouts. The first step's gradients, computed at
    # identical weights, are compared per parameter kind (``grads``) with no such smoothing.
    opt_cfg = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.1, adam_eps=1e-5)
    optimizer = build_optimizer(opt_cfg, chunks, distributed=layout.distributed_optimizer, bf16=False)
    scheduler = build_scheduler(opt_cfg, optimizer, STEPS)
    out = []
    for step in range(STEPS):
        micro = batches(step, dp_rank, dp)
        r = train_step(chunks, optimizer, scheduler, iter(micro), len(micro), SEQ, 1, document_masks=docs)
        out.append({"loss": r.loss, "grad_norm": r.grad_norm, "tokens": r.tokens, **r.extra})
        if step == 0 and not layout.distributed_optimizer:
            out[0]["grads"] = grad_norms_by_kind(chunks)
    return out


def grad_norms_by_kind(chunks) -> dict:
    """Gradient norm per parameter kind (name without layer and expert indices, summed over every
    layer and expert of the model), assembled from all ranks: each shard counted once."""
    from megatron.core import parallel_state as ps

    sums = {}
    for chunk in chunks:
        for name, p in chunk.module.named_parameters():
            expert = not getattr(p, "allreduce", True)
            if expert:
                replica = ps.get_expert_data_parallel_rank() or (
                    ps.get_expert_tensor_parallel_rank() if not getattr(p, "tensor_model_parallel", False) else 0)
            else:
                replica = ps.get_data_parallel_rank(with_context_parallel=True) or (
                    ps.get_tensor_model_parallel_rank() if not getattr(p, "tensor_model_parallel", False) else 0)
            # A later pipeline stage's copy of the embedding (tied output weight, MTP) holds the
            # same, already summed, gradient as the first stage's.
            if replica or getattr(p, "shared", False):
                continue
            key = re.sub(r"\.\d+\.", ".", name)
            sums[key] = sums.get(key, 0.0) + float(p.main_grad.double().pow(2).sum())
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, sums)
    total = {}
    for part in parts:
        for key, v in part.items():
            total[key] = total.get(key, 0.0) + v
    return {key: v ** 0.5 for key, v in sorted(total.items())}


def main():
    mode, workdir = sys.argv[1], sys.argv[2]
    rank, world = init_distributed()
    init_dir = os.path.join(workdir, "init")
    mtp_init = os.path.join(workdir, "init_mtp")
    if mode == "reference":
        results = {"reference": run(ParallelConfig(), init_dir, save_init=True),
                   "reference_docs": run(ParallelConfig(), init_dir, save_init=False, docs=True),
                   "reference_mtp": run(ParallelConfig(), mtp_init, save_init=True, model=MTP_MODEL)}
        results["reference_docs_mtp"] = run(ParallelConfig(), mtp_init, save_init=False,
                                            model=MTP_MODEL, docs=True)
    else:
        names = sys.argv[3].split(",") if len(sys.argv) > 3 else list(LAYOUTS)
        results = {name: run(LAYOUTS[name], init_dir, save_init=False) for name in names}
        for name in names:
            if name in DOC_LAYOUTS:
                results[name + "_docs"] = run(LAYOUTS[name], init_dir, save_init=False, docs=True)
                # MTP keeps to documents too (no depth predicts across a boundary), across CP.
                results[name + "_docs_mtp"] = run(LAYOUTS[name], mtp_init, save_init=False,
                                                  model=MTP_MODEL, docs=True)
            results[name + "_mtp"] = run(LAYOUTS[name], mtp_init, save_init=False, model=MTP_MODEL)
    if rank == 0:
        with open(os.path.join(workdir, f"{mode}.json"), "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
