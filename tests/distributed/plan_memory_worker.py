"""Worker for tests/test_plan.py (run by torchrun, 2 CPU processes): for each layout, build the
tiny recipe's megatron-core model and optimizer as the trainer does, take one step, and report
what each rank holds — bytes of parameters, of gradients (megatron DDP's main_grad) and of the
optimizer state (Adam moments and fp32 master weights) — to hold the planner's memory model
(hymoe.launch.memory) against."""

import json
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from hymoe.parallel.layout import ParallelConfig  # noqa: E402
from hymoe.parallel.setup import init_distributed, initialize_model_parallel  # noqa: E402
from hymoe.train.model_setup import build_model_chunks  # noqa: E402
from hymoe.train.optim import OptimConfig, build_optimizer, build_scheduler  # noqa: E402
from hymoe.train.recipe import load_recipe  # noqa: E402
from hymoe.train.step import train_step  # noqa: E402
from hymoe.train.trainer import padded_vocab  # noqa: E402

VOCAB, SEQ, GLOBAL_BATCH = 500, 32, 4
# name -> (layout, parameter dtype); bf16 is what a GPU run holds (fp32 master weights in the
# optimizer), fp32 what a CPU run holds (no master copy).
LAYOUTS = {
    "dp2_distopt_bf16": (ParallelConfig(distributed_optimizer=True), torch.bfloat16),
    "tp2_ep2_distopt_bf16": (ParallelConfig(tp=2, ep=2, distributed_optimizer=True),
                             torch.bfloat16),
    "pp2_fp32": (ParallelConfig(pp=2), torch.float32),
}


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure(name: str) -> dict:
    from megatron.core import parallel_state

    layout, dtype = LAYOUTS[name]
    model = load_recipe("tiny", []).model
    initialize_model_parallel(layout, seed=1)
    chunks, _ = build_model_chunks(model, layout, padded_vocab(VOCAB, layout.tp), dtype)
    opt_cfg = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant")
    optimizer = build_optimizer(opt_cfg, chunks, distributed=layout.distributed_optimizer,
                                bf16=dtype == torch.bfloat16)
    scheduler = build_scheduler(opt_cfg, optimizer, 1)
    dp = parallel_state.get_data_parallel_world_size()
    g = torch.Generator().manual_seed(7)
    data = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    mine = data[parallel_state.get_data_parallel_rank()::dp]
    micro = [{"tokens": s[None, :-1], "labels": s[None, 1:], "loss_mask": torch.ones(1, SEQ)}
             for s in mine]
    train_step(chunks, optimizer, scheduler, iter(micro), len(micro), SEQ, 1)

    params = [(n, p) for c in chunks for n, p in c.named_parameters()]
    out = {
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "dense_params": sum(p.numel() for n, p in params if ".mlp.experts." not in n),
        "expert_params": sum(p.numel() for n, p in params if ".mlp.experts." in n),
        "params": sum(nbytes(p) for _, p in params),
        "grads": sum(nbytes(p.main_grad) for _, p in params),
        "optimizer": 0,
    }
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    for sub in subs:
        for state in sub.optimizer.state.values():
            out["optimizer"] += sum(nbytes(v) for k, v in state.items()
                                    if torch.is_tensor(v) and k != "step")
        if dtype != torch.float32:  # the optimizer's parameters are fp32 master copies
            out["optimizer"] += sum(nbytes(p) for grp in sub.optimizer.param_groups
                                    for p in grp["params"])
    return out


def main():
    rank, world = init_distributed()
    results = {}
    for name in LAYOUTS:
        mine = measure(name)
        every = [None] * world
        dist.all_gather_object(every, mine)
        results[name] = every
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
