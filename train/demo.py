"""``make demo``: the tiny hybrid MoE on the embedded corpus, in BF16 and in emulated NVFP4, then
the loss-curve comparison. On CPU the high-precision arm computes in fp32 (bf16 matmuls are very
slow on CPUs); the NVFP4 arm quantizes its GEMM operands exactly as on a Blackwell GPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def run_demo(out: str, steps: int | None = None) -> dict:
    from rich.console import Console

    from hymoe.train.compare import compare_runs
    from hymoe.train.recipe import load_recipe
    from hymoe.train.trainer import Trainer

    console = Console(highlight=False, soft_wrap=True)
    out_dir = Path(out)
    runs = {}
    for precision in ("bf16", "nvfp4"):
        run_dir = out_dir / precision
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a demo is a fresh run every time
        overrides = [f"precision={precision}", f"run.dir={run_dir}", f"run.name=demo_{precision}"]
        if steps:
            overrides.append(f"train.steps={steps}")
        console.rule(f"demo: tiny · {precision}")
        history = Trainer(load_recipe("tiny", overrides)).train()
        runs[precision] = run_dir
        console.print(f"{precision}: loss {history[0]['loss']:.3f} (step 1) → {history[-1]['loss']:.3f} (step {history[-1]['step']})")
    summary = compare_runs([str(runs["bf16"]), str(runs["nvfp4"])], out_dir)
    console.rule("demo: comparison")
    if not torch.cuda.is_available():
        console.print("(CPU: the high-precision arm computed in fp32)")
    for line in summary["lines"]:
        console.print(line)
    (out_dir / "demo_summary.json").write_text(json.dumps(summary["runs"], indent=1))
    return summary
