"""Checkpoint save/load throughput: hymoe's checkpoint (megatron dist-checkpoint + per-file sha256 +
atomic rename) vs a plain ``torch.save``/``torch.load`` of the same model and optimizer state, in
one run, in a world of one on CPU.

    python benchmarks/checkpoint.py [--hidden 512] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
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
    scheduler = build_scheduler(opt_cfg, optimizer, 10)
    # Adam's moments exist only after a step: take one on random tokens.
    from hymoe.train.step import train_step

    tokens = torch.randint(0, 32768, (2, 65))
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 64)}
    train_step(chunks, optimizer, scheduler, iter([batch]), 1, 64, 2)
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

    mb = state_bytes / 1e6
    print(f"state: {mb:,.0f} MB (weights + Adam moments, fp32), {sum(p.numel() for p in chunks[0].parameters())/1e6:.1f}M parameters")
    print(f"{'operation':38s} {'seconds':>8s} {'MB/s':>8s} {'vs torch':>9s}")
    print(f"{'torch.save':38s} {t_save_plain:8.2f} {mb/t_save_plain:8.0f} {1.0:9.2f}")
    print(f"{'hymoe save (dist-ckpt+sha256+rename)':38s} {t_save:8.2f} {mb/t_save:8.0f} {t_save/t_save_plain:9.2f}")
    print(f"{'torch.load':38s} {t_load_plain:8.2f} {mb/t_load_plain:8.0f} {1.0:9.2f}")
    print(f"{'hymoe load (verify sha256)':38s} {t_load:8.2f} {mb/t_load:8.0f} {t_load/t_load_plain:9.2f}")
    print(f"{'hymoe load (no verify)':38s} {t_load_nv:8.2f} {mb/t_load_nv:8.0f} {t_load_nv/t_load_plain:9.2f}")


if __name__ == "__main__":
    main()
