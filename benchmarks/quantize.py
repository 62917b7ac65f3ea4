"""NVFP4 quantize + dequantize throughput: hymoe (eager; torch.compile'd on CPU, Triton kernels on
CUDA) against torchao's NVFP4 on the same tensor, and against a plain copy of it. One run prints
one table. (benchmarks/triton_check.py, part of `make gpu-check`, is the GPU measurement of record.)

    python benchmarks/quantize.py                       # CPU (and CUDA if present), 4096 x 4096
    python benchmarks/quantize.py --rows 2048 --cols 2048 --threads 2 --json out.json

Each row times x -> quantize (1D blocks along the last dim, round-to-nearest, two-level scaling:
FP32 per-tensor amax scale + E4M3 block scales) -> dequantize to float32: the best and the median
of ``--repeats`` calls after one warm-up call (whose time, the compile for the compiled row, is
shown as "first call"). Throughput and "x torchao" use the best call (the least disturbed by other
work on a shared machine). "x torchao" compares with torchao's
``NVFP4Tensor.to_nvfp4(x, per_tensor_scale=...)`` + ``.dequantize()`` (amax included in both).
The "agree" column is the fraction of dequantized values within 2 float32 ulps of torchao's (the two
scale in a different order; codes differ only at exact rounding midpoints, see tests/test_nvfp4.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: str, repeats: int) -> tuple[float, list[float]]:
    """(seconds of the first call, seconds of each of the next `repeats` calls)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return first, times


def methods(x: torch.Tensor, device: str) -> dict:
    from hymoe.precision import nvfp4

    out = {"copy": lambda: x.clone()}
    try:
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

        def torchao():
            pts = per_tensor_amax_to_scale(x.abs().amax().float())
            return NVFP4Tensor.to_nvfp4(x, per_tensor_scale=pts).dequantize(torch.float32)

        out["torchao 0.18"] = torchao
    except ImportError:
        pass

    def hymoe(compile_mode, triton_mode="off"):
        def run():
            nvfp4.set_compile(compile_mode)
            nvfp4.set_triton(triton_mode)
            return nvfp4.quantize(x).dequantize()

        return run

    out["hymoe eager"] = hymoe("off")
    if device == "cpu":
        out["hymoe compiled"] = hymoe("on")
    else:  # the default on CUDA (precision/triton_kernels.py)
        out["hymoe triton"] = hymoe("off", "auto")
    return out


def bench(device: str, rows: int, cols: int, repeats: int) -> list[dict]:
    from hymoe.precision import nvfp4

    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=g).to(device)
    results, outputs = [], {}
    for name, fn in methods(x, device).items():
        first, times = timeit(fn, device, repeats)
        outputs[name] = fn()
        best = min(times)
        results.append({"device": device, "method": name, "first_call_s": first, "best_s": best,
                        "median_s": statistics.median(times),
                        "melem_per_s": x.numel() / best / 1e6,
                        "gb_per_s": x.numel() * x.element_size() / best / 1e9})
    nvfp4.set_compile("auto")
    nvfp4.set_triton("auto")
    ao = next((r for r in results if r["method"].startswith("torchao")), None)
    for r in results:
        r["x_torchao"] = ao["best_s"] / r["best_s"] if ao else None
        if ao and r["method"].startswith("hymoe"):
            a, b = outputs[r["method"]], outputs[ao["method"]]
            r["agree"] = ((a - b).abs() <= 2.0**-22 * b.abs()).float().mean().item()
    return results


def table(results: list[dict], rows: int, cols: int) -> str:
    lines = [
        (
            f"NVFP4 quantize+dequantize, {rows} x {cols} float32, torch {torch.__version__}, "
            f"{torch.get_num_threads()} CPU thread(s)"
        ),
        (
            f"{'device':6s}  {'method':15s}  {'best ms':>9s}  {'median':>9s}  {'Melem/s':>9s}  "
            f"{'GB/s in':>8s}  {'x torchao':>9s}  {'agree':>8s}  first call"
        ),
    ]
    for r in results:
        xt = f"{r['x_torchao']:.1f}x" if r["x_torchao"] else "-"
        agree = f"{r['agree']:.4%}" if "agree" in r else "-"
        lines.append(
            f"{r['device']:6s}  {r['method']:15s}  {r['best_s'] * 1e3:9.2f}  "
            f"{r['median_s'] * 1e3:9.2f}  {r['melem_per_s']:9.1f}  {r['gb_per_s']:8.2f}  {xt:>9s}  {agree:>8s}  "
            f"{r['first_call_s']:.2f} s"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: shared machines)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cpu, plus cuda if present)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    results = []
    for device in devices:
        results += bench(device, args.rows, args.cols, args.repeats)
    print(table(results, args.rows, args.cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
