"""Checkpoint save/load throughput: hymoe's checkpoint (megatron dist-checkpoint + per-file sha256 +
atomic rename) vs a plain ``torch.save``/``torch.load`` of the same model and optimizer state, in
one run, in a world of one on CPU. Then the cost of an asynchronous save (checkpoint.async_save)
to training: how long the loop blocks to start and to finalize it, and the step time while the
background writer runs vs without a save in flight, as ratios in the same run.

    python benchmarks/checkpoint.py [--hidden 512] [--repeats 2] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="steps without a save in flight, per repeat")
    args = ap.parse_args()

    import torch

    from hymoe.model.config import ModelConfig
    from hymoe.parallel.layout import ParallelConfig
    from hymoe.parallel.setup import init_distributed, initialize_model_parallel
    from hymoe.train import checkpoint as ckpt
    from hymoe.train.model_setup import build_model_chunks
    from hymoe.train.optim import OptimConfig, build_optimizer, build_scheduler

    init_distributed()
    layout = ParallelConfig()
    initialize_model_parallel(layout, seed=0)
    h = args.hidden
    model = ModelConfig(pattern="M*EM-E", hidden_size=h, ffn_hidden_size=4 * h, num_attention_heads=8,
                        num_query_groups=2, head_dim=h // 8, mamba_num_heads=h // 32, mamba_head_dim=64,
                        mamba_num_groups=2, num_experts=8, moe_ffn_hidden_size=h,
                        moe_shared_expert_intermediate_size=2 * h)
    chunks, _ = build_model_chunks(model, layout, vocab_size=32768)
    opt_cfg = OptimConfig(warmup_steps=0)
    optimizer = build_optimizer(opt_cfg, chunks, distributed=False, bf16=False)
    scheduler = build_scheduler(opt_cfg, optimizer, 100_000)
    # Adam's moments exist only after a step: take one on random tokens.
    from hymoe.train.step import train_step

    tokens = torch.randint(0, 32768, (2, 65))
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 64)}

    def step() -> float:
        t0 = time.perf_counter()
        train_step(chunks, optimizer, scheduler, iter([batch]), 1, 64, 2)
        return time.perf_counter() - t0

    step()
    state_bytes = sum(p.numel() * 4 * 3 for p in chunks[0].parameters())  # weights + 2 moments

    def best(fn):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain = tmp / "plain.pt"
        t_save_plain = best(lambda: torch.save(
            {"model": chunks[0].module.state_dict(), "optimizer": optimizer.state_dict()}, plain))
        t_load_plain = best(lambda: torch.load(plain, weights_only=False))
        t_save = best(lambda: ckpt.save(tmp / "ck", 1, chunks, optimizer, scheduler, {"tokens": 0}))
        path = ckpt.latest_checkpoint(tmp / "ck")
        t_load = best(lambda: ckpt.load(path, chunks, optimizer, scheduler, verify_files=True))
        t_load_nv = best(lambda: ckpt.load(path, chunks, optimizer, scheduler, verify_files=False))
        quiet, in_flight, start, finalize, background = [], [], [], [], []
        for r in range(args.repeats):
            quiet += [step() for _ in range(args.steps)]
            fly, t_start, t_final, t_bg = async_save_steps(ckpt, step, tmp / "ack", 10 + r, chunks,
                                                           optimizer, scheduler)
            in_flight += fly
            start.append(t_start)
            finalize.append(t_final)
            background.append(t_bg)

    mb = state_bytes / 1e6
    print(f"state: {mb:,.0f} MB (weights + Adam moments, fp32), {sum(p.numel() for p in chunks[0].parameters())/1e6:.1f}M parameters")
    print(f"{'operation':38s} {'seconds':>8s} {'MB/s':>8s} {'vs torch':>9s}")
    print(f"{'torch.save':38s} {t_save_plain:8.2f} {mb/t_save_plain:8.0f} {1.0:9.2f}")
    print(f"{'hymoe save (dist-ckpt+sha256+rename)':38s} {t_save:8.2f} {mb/t_save:8.0f} {t_save/t_save_plain:9.2f}")
    print(f"{'torch.load':38s} {t_load_plain:8.2f} {mb/t_load_plain:8.0f} {1.0:9.2f}")
    print(f"{'hymoe load (verify sha256)':38s} {t_load:8.2f} {mb/t_load:8.0f} {t_load/t_load_plain:9.2f}")
    print(f"{'hymoe load (no verify)':38s} {t_load_nv:8.2f} {mb/t_load_nv:8.0f} {t_load_nv/t_load_plain:9.2f}")
    med = statistics.median
    print(f"\nasync save (checkpoint.async_save), {args.repeats} saves:")
    blocked = med(start) + med(finalize)
    print(f"  blocks the loop {med(start):.2f} s to start + {med(finalize):.2f} s to finalize "
          f"(vs {t_save:.2f} s for a synchronous save: {blocked / t_save:.2f}×)")
    print(f"  written in the background in {med(background):.2f} s, "
          f"over {len(in_flight)} steps in all")
    print(f"  step time without a save in flight {med(quiet):.3f} s (median of {len(quiet)}), "
          f"with one {med(in_flight):.3f} s (median of {len(in_flight)}): "
          f"{med(in_flight) / med(quiet):.2f}×")
    slower = (sum(in_flight) - len(in_flight) * med(quiet)) / args.repeats
    print(f"  training time lost per save: {blocked:.2f} s blocked + {slower:.2f} s of slower steps "
          f"= {blocked + slower:.2f} s (synchronous: {t_save:.2f} s)")


def async_save_steps(ckpt, step, root, step_number, chunks, optimizer, scheduler):
    """Start an asynchronous save, train until it is finalized; return (times of the steps taken
    while it was written, seconds to start it, seconds of the finalizing poll, seconds from start
    to written)."""
    from hymoe.train.async_save import AsyncCheckpointQueue

    queue = AsyncCheckpointQueue()
    t0 = time.perf_counter()
    ckpt.save(root, step_number, chunks, optimizer, scheduler, {"tokens": 0}, async_queue=queue)
    t_start = time.perf_counter() - t0
    times = []
    while True:
        times.append(step())
        t1 = time.perf_counter()
        done = queue.poll()
        if done is not None:
            return times, t_start, time.perf_counter() - t1, t1 - t0 - t_start


if __name__ == "__main__":
    main()
