"""``make demo``: the tiny hybrid MoE on the embedded corpus, in BF16 and in emulated NVFP4, then
the loss-curve comparison. On CPU the high-precision arm computes in fp32 (bf16 matmuls are very
slow on CPUs); the NVFP4 arm quantizes its GEMM operands exactly as on a Blackwell GPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

ARMS = ("bf16", "nvfp4")  # the baseline first: compare measures the gap against it
DEMO_VALID = ".cache/hymoe/demo_valid"


def run_demo(out: str, steps: int | None = None) -> dict:
    from hymoe.train.compare import compare_runs
    from hymoe.train.sweep import run_sweep
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    out_dir = Path(out)
    for arm in ARMS:
        if (out_dir / arm).exists():
            shutil.rmtree(out_dir / arm)  # a demo is a fresh run every time
    # The two arms are a Hydra multirun over the precision, as `hymoe train tiny -m
    # precision=bf16,nvfp4` runs it: same data, same seed, one run directory per arm.
    # Validation every 50 steps on held-out demo documents (standard-library files the training
    # corpus leaves out, prepared beside it on first use): the same batches for both arms.
    overrides = [f"precision={','.join(ARMS)}", "run.name=demo_${precision.recipe}",
                 f"data.valid_path={DEMO_VALID}", "train.eval_interval=50", "train.eval_iters=4"]
    if steps:
        overrides.append(f"train.steps={steps}")
    runs = {}
    for arm, run_dir, history in run_sweep(
            "tiny", overrides, out_dir, subdir="values",
            before_job=lambda arm, _: console.rule(f"demo: tiny · {arm}")):
        runs[arm] = run_dir
        console.print(f"{arm}: loss {history[0]['loss']:.3f} (step 1) → {history[-1]['loss']:.3f} "
                      f"(step {history[-1]['step']})")
    summary = compare_runs([str(runs[a]) for a in ARMS], out_dir)
    console.rule("demo: comparison")
    if not torch.cuda.is_available():
        console.print("(CPU: the high-precision arm computed in fp32)")
    for line in summary["lines"]:
        console.print(line)
    (out_dir / "demo_summary.json").write_text(json.dumps(summary["runs"], indent=1))
    return summary
