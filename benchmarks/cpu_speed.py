"""CPU speed, as ratios inside one run (the machines are shared and noisy; absolute numbers are
printed for reference only):

1. step time of the `tiny` recipe with emulated NVFP4 vs its high-precision twin (fp32 on CPU);
2. the chunked SSD scan (hymoe.model.ssd) vs the step-by-step recurrence, forward+backward.

    python benchmarks/cpu_speed.py [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def train_step_time(precision: str, steps: int, workdir: Path) -> float:
    run = workdir / precision
    subprocess.run(
        [sys.executable, "-m", "hymoe", "train", "tiny", f"precision={precision}",
         f"train.steps={steps}", f"run.dir={run}", "logging.wandb=disabled",
         "logging.progress=false", "checkpoint.save_final=false", f"data.path={workdir / 'data'}"],
        check=True, capture_output=True,
    )
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["step_time_s"] for r in rows[5:])


def scan_times(repeats: int = 5) -> tuple[float, float]:
    from hymoe.model import ssd

    g = torch.Generator().manual_seed(0)
    b, seq, h, p, n = 2, 512, 8, 16, 32
    x = torch.randn(b, seq, h, p, generator=g, requires_grad=True)
    dt = torch.randn(b, seq, h, generator=g, requires_grad=True)
    a = -torch.rand(h, generator=g) - 0.5
    bm = torch.randn(b, seq, 1, n, generator=g)
    cm = torch.randn(b, seq, 1, n, generator=g)

    def timed(fn):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn().sum().backward()
            best = min(best, time.perf_counter() - t0)
        return best

    chunked = timed(lambda: ssd.ssd_chunk_scan(x, dt, a, bm, cm, chunk_size=64))
    naive = timed(lambda: ssd.ssd_naive(x, dt, a, bm, cm))
    return chunked, naive


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hp = train_step_time("bf16", args.steps, tmp)
        fp4 = train_step_time("nvfp4", args.steps, tmp)
    chunked, naive = scan_times()
    print(f"tiny step time: high precision (fp32 on CPU) {hp * 1e3:.1f} ms, NVFP4 emulated {fp4 * 1e3:.1f} ms"
          f" -> NVFP4/fp32 = {fp4 / hp:.2f}x")
    print(f"SSD scan fwd+bwd (B=2, L=512, H=8, P=16, N=32): chunked {chunked * 1e3:.1f} ms, "
          f"step-by-step {naive * 1e3:.1f} ms -> {naive / chunked:.1f}x faster")


if __name__ == "__main__":
    main()
