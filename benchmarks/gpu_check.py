"""The GPU checks behind `make gpu-check`: first the Triton quantization kernels
(benchmarks/triton_check.py: bits against the eager path, quantize+dequantize throughput against a
copy, an emulated NVFP4 linear step against BF16), then the Mamba-2 kernels
(benchmarks/ssd_kernels_check.py: mamba-ssm's Triton SSD scan against hymoe's, outputs, gradients
and forward+backward time at a Nano layer's shape), then short training runs; each in its own process
with a timeout, the runs summarised from their ``metrics.jsonl``. benchmarks/gpu_check.sh prepares
the Python environment and calls this; docs/benchmarks.md says what is measured and why.

Step time and tokens/s are medians over the steps after the first ``WARMUP_STEPS`` (those include
CUDA context start-up, kernel compilation and allocator growth). NVFP4 is emulated (each GEMM
operand quantized and dequantized in PyTorch, the GEMM in FP32; Hopper has no FP4 tensor cores), so
its step-time ratio to BF16 is the cost of the emulation, not a speed-up. Apart from the CUDA check
in main(), this file needs only the standard library.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

WARMUP_STEPS = 5

# (name, recipe, steps, overrides, timeout_s, required). An optional check runs only while the
# budget still holds its whole timeout, so the script stays under 8 minutes.
CHECKS = [
    ("tiny_gpu-bf16", "tiny_gpu", 50, [], 240, True),
    ("tiny-bf16", "tiny", 20, [], 90, True),
    ("tiny-nvfp4", "tiny", 20, ["precision=nvfp4"], 120, True),
    ("tiny_gpu-nvfp4", "tiny_gpu", 20, ["precision=nvfp4"], 150, False),
]
# The kernel check runs first (the NVFP4 runs use its kernels): (name, timeout_s). It is required:
# different bits fail gpu-check; its throughput and step-time goals are reported, not enforced.
KERNEL_CHECK = ("triton-kernels", 150)
# The same for the Mamba-2 scan (name, timeout_s): most of its time is mamba-ssm's autotuning.
SSD_KERNEL_CHECK = ("ssd-kernels", 150)
# After the runs, if the budget still holds it: the planner's memory model (hymoe.launch.memory)
# against torch.cuda's allocator on tiny_gpu (benchmarks/memory_check.py). Optional.
MEMORY_CHECK = ("plan-memory", 120)
# (emulated run, its BF16 baseline): step-time ratios for the summary.
RATIOS = [("tiny-nvfp4", "tiny-bf16"), ("tiny_gpu-nvfp4", "tiny_gpu-bf16")]


def summarize_metrics(path: Path, warmup: int = WARMUP_STEPS) -> dict:
    """Medians of step_time_s and tokens_per_s over steps > ``warmup`` of one metrics.jsonl."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    timed = [r for r in rows if r["step"] > warmup]
    losses = [r["loss"] for r in rows]

    def median(key):
        return statistics.median(r[key] for r in timed) if timed else None

    return {
        "steps": len(rows),
        "timed_steps": len(timed),
        "median_step_time_s": median("step_time_s"),
        "median_tokens_per_s": median("tokens_per_s"),
        "first_step_time_s": rows[0]["step_time_s"] if rows else None,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "losses_finite": all(math.isfinite(x) for x in losses),
    }


def run_child(cmd: list[str], timeout_s: float, log, **env) -> tuple[str, float]:
    """Run ``cmd`` with its output in ``log``; kill its whole process group on timeout.
    Returns (status, wall seconds)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **env))
    try:
        rc = proc.wait(timeout=timeout_s)
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = f"timed out after {timeout_s:.0f} s"
    return status, round(time.monotonic() - t0, 1)


def run_check(name, recipe, steps, overrides, timeout_s, work: Path, log) -> dict:
    """Train ``recipe`` for ``steps`` steps in a child process; kill its process group on
    timeout."""
    run_dir = work / "runs" / name
    cmd = [
        sys.executable, "-m", "hymoe", "train", recipe, f"train.steps={steps}",
        "logging.wandb=disabled", "logging.progress=false", "checkpoint.save_final=false",
        f"run.dir={run_dir}", f"data.path={work / 'demo_data'}", *overrides,
    ]
    log.write(f"\n===== {name}: {' '.join(cmd[1:])} (timeout {timeout_s:.0f} s)\n")
    log.flush()
    print(f"[gpu-check] {name}: {recipe}, {steps} steps {' '.join(overrides)}"
          f" (timeout {timeout_s:.0f} s)", flush=True)
    status, wall = run_child(cmd, timeout_s, log, WANDB_MODE="disabled")
    result = {"name": name, "recipe": recipe, "steps_asked": steps, "overrides": overrides,
              "status": status, "wall_s": wall}
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        result.update(summarize_metrics(metrics))
        if status == "ok" and not result["losses_finite"]:
            result["status"] = "failed (non-finite loss)"
    elif status == "ok":
        result["status"] = "failed (no metrics.jsonl)"
    print(f"[gpu-check] {name}: {result['status']} in {result['wall_s']} s", flush=True)
    return result


def run_kernel_check(timeout_s, device: str, out: Path, log, name: str = KERNEL_CHECK[0],
                     script: str = "triton_check.py", extra: tuple = ()) -> dict:
    """benchmarks/<script> (triton_check.py, ssd_kernels_check.py, memory_check.py) in a child
    process (killed on timeout); its report in "text"."""
    report = out / script.replace(".py", ".json")
    report.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).with_name(script)), "--device", device,
           "--json", str(report), *extra]
    log.write(f"\n===== {name}: {' '.join(cmd[1:])} (timeout {timeout_s:.0f} s)\n")
    log.flush()
    print(f"[gpu-check] {name}: benchmarks/{script} --device {device}"
          f" (timeout {timeout_s:.0f} s)", flush=True)
    status, wall = run_child(cmd, timeout_s, log)
    result = {"name": name, "recipe": "-", "status": status, "wall_s": wall}
    if report.exists():
        data = json.loads(report.read_text())
        result["text"] = data.pop("text", "")
        result["report"] = data
    print(f"[gpu-check] {name}: {status} in {result['wall_s']} s", flush=True)
    return result


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def render(results: list[dict], ratios: dict, header: list[str]) -> str:
    columns = (f"{'check':<16} {'status':<28} {'steps':>5} {'step s (median)':>16}"
               f" {'tokens/s (median)':>18} {'loss first -> last':>20} {'wall s':>7}")
    lines = [*header, "", columns]
    for r in results:
        loss = f"{_fmt(r.get('loss_first'), '.3f')} -> {_fmt(r.get('loss_last'), '.3f')}"
        lines.append(
            f"{r['name']:<16} {r['status']:<28} {r.get('steps', 0):>5}"
            f" {_fmt(r.get('median_step_time_s'), '.4f'):>16}"
            f" {_fmt(r.get('median_tokens_per_s'), ',.0f'):>18} {loss:>20} {r['wall_s']:>7}"
        )
    note = (f"medians over steps > {WARMUP_STEPS}; NVFP4 is emulated (quantizers plus GEMMs with"
            " FP32 accumulation: BF16 tensor cores on CUDA, FP32 on CPU), so its ratio to BF16 is"
            " the emulation's cost")
    lines += ["", note]
    lines += [f"step-time ratio {key}: {_fmt(value, '.2f')}" for key, value in ratios.items()]
    for r in results:
        if r.get("text"):
            lines += ["", r["text"].rstrip("\n")]
    return "\n".join(lines) + "\n"


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="scratch folder: run dirs, demo data")
    p.add_argument("--out", type=Path, default=None, help="write gpu_check.{txt,json,log} here")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no check past this")
    p.add_argument("--only", default="", help="comma-separated check names (default: all)")
    p.add_argument("--steps", type=int, default=None, help="override every check's step count")
    p.add_argument("--allow-cpu", action="store_true", help="run without CUDA (tests this file)")
    p.add_argument("--header", action="append", default=[], help="a line for the summary's top")
    args = p.parse_args(argv)

    if not args.allow_cpu:
        import torch

        if not torch.cuda.is_available():
            print("no NVIDIA GPU: gpu-check needs one (torch.cuda.is_available() is False)")
            return 1
    deadline = time.monotonic() + args.budget_s
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.out or args.work
    out.mkdir(parents=True, exist_ok=True)
    only = {s for s in args.only.split(",") if s}
    results = []
    with open(out / "gpu_check.log", "w") as log:
        if not only or KERNEL_CHECK[0] in only:
            left = deadline - time.monotonic()
            device = "cuda" if not args.allow_cpu or _has_cuda() else "cpu"
            result = run_kernel_check(min(KERNEL_CHECK[1], max(left, 1)), device, out, log)
            results.append({**result, "required": True})
        if not only or SSD_KERNEL_CHECK[0] in only:
            left = deadline - time.monotonic()
            device = "cuda" if not args.allow_cpu or _has_cuda() else "cpu"
            result = run_kernel_check(min(SSD_KERNEL_CHECK[1], max(left, 1)), device, out, log,
                                      SSD_KERNEL_CHECK[0], "ssd_kernels_check.py")
            results.append({**result, "required": True})
        for name, recipe, steps, overrides, timeout_s, required in CHECKS:
            if only and name not in only:
                continue
            left = deadline - time.monotonic()
            if left < (30 if required else timeout_s):
                status = f"skipped ({max(left, 0):.0f} s of budget left)"
                print(f"[gpu-check] {name}: {status}", flush=True)
                results.append({"name": name, "recipe": recipe, "steps_asked": steps,
                                "required": required, "status": status, "wall_s": 0})
                continue
            extra = list(overrides)
            if args.steps is not None:
                steps = args.steps
                extra.append("optim.warmup_steps=1")  # a recipe's warmup may exceed a short run
            result = run_check(name, recipe, steps, extra, min(timeout_s, left), args.work, log)
            results.append({**result, "required": required})
        if not only or MEMORY_CHECK[0] in only:
            left = deadline - time.monotonic()
            name, timeout_s = MEMORY_CHECK
            if left < timeout_s and not only:
                status = f"skipped ({max(left, 0):.0f} s of budget left)"
                print(f"[gpu-check] {name}: {status}", flush=True)
                results.append({"name": name, "recipe": "tiny_gpu", "required": False,
                                "status": status, "wall_s": 0})
            else:
                device = "cuda" if not args.allow_cpu or _has_cuda() else "cpu"
                recipe = "tiny_gpu" if device == "cuda" else "tiny"
                result = run_kernel_check(timeout_s, device, out, log, name, "memory_check.py",
                                          ("--recipe", recipe, f"data.path={args.work / 'demo_data'}"))
                results.append({**result, "recipe": recipe, "required": False})

    by_name = {r["name"]: r for r in results}
    ratios = {}
    for emulated, base in RATIOS:
        if emulated in by_name or base in by_name:
            a = by_name.get(emulated, {}).get("median_step_time_s")
            b = by_name.get(base, {}).get("median_step_time_s")
            ratios[f"{emulated} / {base}"] = a / b if a and b else None
    text = render(results, ratios, args.header)
    (out / "gpu_check.txt").write_text(text)
    summary = {"header": args.header, "results": results, "ratios": ratios}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(text, end="")
    # An optional check may be skipped for time; every check that ran must pass.
    failed = [r["name"] for r in results
              if r["status"] != "ok" and (r["required"] or not r["status"].startswith("skipped"))]
    if failed:
        print(f"gpu-check: FAILED: {', '.join(failed)} (see {out / 'gpu_check.log'})")
        return 1
    print(f"gpu-check: ok (summary in {out / 'gpu_check.txt'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
