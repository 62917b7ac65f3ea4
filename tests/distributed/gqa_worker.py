"""Worker for tests/test_layout_rules.py (torchrun, 2 CPU processes): a model with fewer KV groups
than TP ranks (1 group, tp=2: megatron-core all-gathers the QKV output and both ranks use the one
group's K/V) trains the same 3 steps as the same initial weights under dp=2. Writes both runs'
losses and grad norms."""

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from hymoe.model.config import ModelConfig  # noqa: E402
from hymoe.parallel.layout import ParallelConfig  # noqa: E402
from hymoe.parallel.setup import init_distributed, initialize_model_parallel  # noqa: E402
from hymoe.train.checkpoint import load_model_weights, save_model_weights  # noqa: E402
from hymoe.train.model_setup import build_model_chunks  # noqa: E402
from hymoe.train.optim import OptimConfig, build_optimizer, build_scheduler  # noqa: E402
from hymoe.train.step import train_step  # noqa: E402

STEPS, GLOBAL_BATCH, SEQ, VOCAB = 3, 4, 32, 256
MODEL = ModelConfig(pattern="M*E-*", num_experts=4, moe_router_topk=2, num_attention_heads=4,
                    num_query_groups=1)


def run(layout: ParallelConfig, init_dir: str, save_init: bool) -> list[dict]:
    from megatron.core import parallel_state

    initialize_model_parallel(layout, seed=1234)
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    chunks, _ = build_model_chunks(MODEL, layout, VOCAB)
    (save_model_weights if save_init else load_model_weights)(chunks, init_dir)
    opt_cfg = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant")
    optimizer = build_optimizer(opt_cfg, chunks, distributed=False, bf16=False)
    scheduler = build_scheduler(opt_cfg, optimizer, STEPS)
    out = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 + step)
        data = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)[dp_rank::dp]
        micro = [{"tokens": s[None, :-1], "labels": s[None, 1:], "loss_mask": torch.ones(1, SEQ)}
                 for s in data]
        r = train_step(chunks, optimizer, scheduler, iter(micro), len(micro), SEQ, 1)
        out.append({"loss": r.loss, "grad_norm": r.grad_norm})
    return out


def main():
    workdir = sys.argv[1]
    rank, _ = init_distributed()
    init_dir = os.path.join(workdir, "init")
    results = {"dp2": run(ParallelConfig(), init_dir, save_init=True),
               "tp2": run(ParallelConfig(tp=2), init_dir, save_init=False)}
    if rank == 0:
        with open(os.path.join(workdir, "gqa.json"), "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
