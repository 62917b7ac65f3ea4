"""The Triton kernels on a GPU (one step of `make gpu-check`): bits, throughput, a linear step.

    python benchmarks/triton_check.py [--json out.json]          # CUDA
    python benchmarks/triton_check.py --device cpu               # CPU, Triton's interpreter, tiny
                                                                 # shapes: tests this script only

1. bits: precision/triton_kernels.py against the eager PyTorch path on the same CUDA tensors:
   NVFP4 codes, E4M3 scales, global amax, dequantized and BF16 block values (1D, 2D, stochastic
   rounding with the same generator, RHT) and MXFP8 data and E8M0 scales (floor, rceil), on the
   input classes of tests/test_precision_triton.py plus large random tensors; and that
   `nvfp4.quantize` picks the Triton path for CUDA tensors. Any difference fails the check.
2. throughput: NVFP4 quantize + dequantize (1D, round-to-nearest, float32 out) against a plain
   copy (`torch.clone`) of the same tensor, Triton and eager. "bw %" is the bytes that the
   kernels must move (amax read, quantize read + write of codes and scales, dequantize read +
   float32 write) per second, as a share of the copy's bytes per second; the issue's goal is
   >= 60% on an H200. "x copy" is plain time(copy) / time(q+dq).
3. linear step: forward + backward of y = x·Wᵀ, emulated NVFP4 (Triton and eager quantizers,
   GEMMs on BF16 tensor cores with FP32 accumulation, `emulated_linear.gemm`) against BF16 and
   FP32 `F.linear`; the issue's goal is NVFP4 / BF16 <= 1.3. Also the same step with the
   reference FP32 GEMMs (`TENSOR_CORES = False`), and the largest relative difference of the
   three GEMMs' outputs between the two (FP32 rounding only: < 1e-5 expected).
Times are medians of CUDA-event-timed calls after warm-up. Each part reports and the script goes
on if one raises; the exit status is 1 if any part raised or any bit differed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--repeats", type=int, default=20)
    return p.parse_args(argv)


ARGS = _parse(sys.argv[1:] if __name__ == "__main__" else [])
if ARGS.device == "cpu":  # read when the kernels are decorated: before hymoe imports them
    os.environ["TRITON_INTERPRET"] = "1"
    # The interpreter evaluates an all-zero block's 1/0 (capped afterwards) in numpy.
    warnings.filterwarnings("ignore", category=RuntimeWarning)

import torch  # noqa: E402 - after TRITON_INTERPRET is set
import torch.nn.functional as F  # noqa: E402
from hymoe.precision import mxfp8, nvfp4  # noqa: E402


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats, warmup=2) -> float:
    """Median seconds of one call of fn."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class use_triton:  # a context manager, named like a function
    """Inside: nvfp4/mxfp8 use the Triton kernels (tk) or, with tk None, the eager path."""

    def __init__(self, tk):
        self.tk = tk

    def __enter__(self):
        self.saved = nvfp4.triton_for
        nvfp4.triton_for = lambda t: self.tk

    def __exit__(self, *exc):
        nvfp4.triton_for = self.saved


# -- 1. bits ---------------------------------------------------------------------------------------
def cases(device: str) -> dict:
    # The test file's input classes (tests/ travels with the working tree), plus large tensors.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from precision_inputs import quantizer_inputs

    return {k: v.to(device) for k, v in quantizer_inputs(large=device == "cuda").items()}


def _nvfp4_equal(a, b) -> bool:
    (qa, da, va), (qb, db, vb) = a, b
    amax = torch.equal(qa.global_amax, qb.global_amax) or bool(
        qa.global_amax.isnan() and qb.global_amax.isnan()
    )
    return (amax and torch.equal(qa.data, qb.data)
            and torch.equal(qa.scale.view(torch.uint8), qb.scale.view(torch.uint8))
            and torch.equal(da.view(torch.int32), db.view(torch.int32))
            and torch.equal(va.view(torch.int16), vb.view(torch.int16)))


def check_bits(tk, device: str) -> dict:
    variants = {"1d": {}, "2d": {"two_d": True}, "sr": {"stochastic": True},
                "2d-sr": {"two_d": True, "stochastic": True}, "rht-sr": {"rht": True,
                                                                         "stochastic": True}}
    mismatches, compared = [], 0
    for name, x in cases(device).items():
        for vname, kw in variants.items():
            if kw.get("two_d") and x.dim() != 2 or kw.get("rht") and x.shape[-1] % 16:
                continue
            pair = []
            for kernels in (None, tk):
                gen = torch.Generator(device=device).manual_seed(3)
                with use_triton(kernels):
                    q = nvfp4.quantize(x, generator=gen, **kw)
                    # and the BF16 block values that the tensor-core GEMMs take
                    pair.append((q, q.dequantize(), q.block_values(torch.bfloat16)))
            compared += 1
            if not _nvfp4_equal(*pair):
                mismatches.append(f"nvfp4 {vname} {name}")
        for mode in mxfp8.SCALING_MODES:
            ref = mxfp8.quantize(x, scaling_mode=mode)
            with use_triton(tk):
                got = mxfp8.quantize(x, scaling_mode=mode)
            compared += 1
            if not (torch.equal(got.data.view(torch.uint8), ref.data.view(torch.uint8))
                    and torch.equal(got.scale, ref.scale)):
                mismatches.append(f"mxfp8 {mode} {name}")
    dispatch = "not checked (CPU)"
    if device == "cuda":
        probe = torch.ones(16, 16, device=device)
        dispatch = "triton" if nvfp4.triton_for(probe) is tk else "EAGER (triton not picked)"
        if nvfp4.triton_for(probe) is not tk:
            mismatches.append("dispatch: nvfp4.triton_for(cuda tensor) did not pick the kernels")
    return {"compared": compared, "mismatches": mismatches, "dispatch_on_cuda": dispatch}


# -- 2. throughput ---------------------------------------------------------------------------------
def check_throughput(tk, device: str, repeats: int) -> list[dict]:
    shapes = [(16384, 8192)] if device == "cuda" else [(64, 64)]
    rows = []
    for shape in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(shape, device=device).to(dtype)
            n, e = x.numel(), x.element_size()
            t_copy = timed(x.clone, device, repeats)
            copy_bw = 2 * n * e / t_copy
            # amax read + quantize read + codes/scales write + their read + float32 write
            qdq_bytes = n * e * 2 + 2 * n * (0.5 + 1 / 16) + 4 * n
            for label, kernels, reps in (("triton", tk, repeats), ("eager", None, 3)):
                with use_triton(kernels):
                    t_q = timed(lambda x=x: nvfp4.quantize(x), device, reps)
                    t_dq = timed(nvfp4.quantize(x).dequantize, device, reps)
                    t_qdq = timed(lambda x=x: nvfp4.quantize(x).dequantize(), device, reps)
                rows.append({
                    "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
                    "path": label, "copy_ms": t_copy * 1e3, "copy_gb_s": copy_bw / 1e9,
                    "quantize_ms": t_q * 1e3, "dequantize_ms": t_dq * 1e3, "qdq_ms": t_qdq * 1e3,
                    "qdq_gb_s": qdq_bytes / t_qdq / 1e9,
                    "bw_fraction_of_copy": qdq_bytes / t_qdq / copy_bw,
                    "time_ratio_copy_over_qdq": t_copy / t_qdq,
                })
    return rows


# -- 3. linear step --------------------------------------------------------------------------------
def check_linear_step(tk, device: str, repeats: int) -> dict:
    from hymoe.precision import emulated_linear
    from hymoe.precision.emulated_linear import quantized_linear

    t, k, nout = (8192, 4096, 4096) if device == "cuda" else (32, 32, 32)
    g = torch.Generator(device=device).manual_seed(0)
    x32 = torch.randn(t, k, device=device, generator=g)
    w32 = torch.randn(nout, k, device=device, generator=g) * k**-0.5
    dy32 = torch.randn(t, nout, device=device, generator=g)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # CPU bf16 GEMMs are very slow

    def step(fn, act_dtype):
        x = x32.to(act_dtype).requires_grad_()
        w = w32.to(act_dtype).requires_grad_()
        dy = dy32.to(act_dtype)

        def run():
            x.grad = w.grad = None
            fn(x, w).backward(dy)

        return run

    sr = torch.Generator(device=device).manual_seed(1)

    def nv(x, w):
        return quantized_linear(x, w, "nvfp4", generator=sr)

    out = {"shape_t_k_n": [t, k, nout], "activation_dtype": str(dtype).removeprefix("torch.")}
    out["gemm_max_rel_diff"] = gemm_agreement(x32, w32, dy32)
    out["bf16_ms"] = timed(step(F.linear, dtype), device, repeats) * 1e3
    out["fp32_ms"] = timed(step(F.linear, torch.float32), device, repeats) * 1e3
    with use_triton(tk):
        out["nvfp4_triton_ms"] = timed(step(nv, dtype), device, repeats) * 1e3
        before, emulated_linear.TENSOR_CORES = emulated_linear.TENSOR_CORES, False
        try:
            out["nvfp4_fp32_gemms_ms"] = timed(step(nv, dtype), device, repeats) * 1e3
        finally:
            emulated_linear.TENSOR_CORES = before
    with use_triton(None):
        out["nvfp4_eager_ms"] = timed(step(nv, dtype), device, max(3, repeats // 4)) * 1e3
    out["nvfp4_triton_over_bf16"] = out["nvfp4_triton_ms"] / out["bf16_ms"]
    out["nvfp4_eager_over_bf16"] = out["nvfp4_eager_ms"] / out["bf16_ms"]
    out["fp32_over_bf16"] = out["fp32_ms"] / out["bf16_ms"]
    out["nvfp4_fp32_gemms_over_bf16"] = out["nvfp4_fp32_gemms_ms"] / out["bf16_ms"]
    return out


def gemm_agreement(x, w, dy) -> float:
    """Largest relative difference between `gemm` on tensor cores and the FP32 reference, over the
    fprop, dgrad and wgrad operand pairs of NVFP4 (round to nearest, no RHT)."""
    from hymoe.precision import nvfp4
    from hymoe.precision.emulated_linear import gemm

    pairs = [(nvfp4.quantize(x), nvfp4.quantize(w, two_d=True)),
             (nvfp4.quantize(dy), nvfp4.quantize(w.t())),
             (nvfp4.quantize(dy.t()), nvfp4.quantize(x.t()))]
    worst = 0.0
    for a, b in pairs:
        ref = gemm(a, b, tb=True, tensor_cores=False)
        fast = gemm(a, b, tb=True, tensor_cores=True)
        worst = max(worst, ((fast - ref).abs().max() / ref.abs().max()).item())
    return worst


def render(res: dict) -> str:
    title = (f"Triton kernel check on {res['device_name']} (torch {torch.__version__}, "
             f"triton {res.get('triton', '?')}, TF32 matmul {res['tf32']})")
    lines = [title]
    bits = res.get("bits")
    if isinstance(bits, dict):
        verdict = "all equal" if not bits["mismatches"] else f"{len(bits['mismatches'])} DIFFER"
        lines.append(f"bits: {bits['compared']} comparisons with the eager path: {verdict}; "
                     f"CUDA dispatch: {bits['dispatch_on_cuda']}")
        lines += [f"  differs: {m}" for m in bits["mismatches"]]
    tp = res.get("throughput")
    if isinstance(tp, list):
        lines.append(f"{'NVFP4 q+dq':<24} {'path':<7} {'copy ms':>8} {'q ms':>8} {'dq ms':>8} "
                     f"{'q+dq ms':>8} {'GB/s':>7} {'bw % copy':>9} {'x copy':>7}")
        for r in tp:
            shape = "x".join(map(str, r["shape"]))
            lines.append(f"{shape + ' ' + r['dtype']:<24} {r['path']:<7} {r['copy_ms']:8.3f} "
                         f"{r['quantize_ms']:8.3f} {r['dequantize_ms']:8.3f} {r['qdq_ms']:8.3f} "
                         f"{r['qdq_gb_s']:7.0f} {r['bw_fraction_of_copy']:9.0%} "
                         f"{r['time_ratio_copy_over_qdq']:7.2f}")
        lines.append("  goal: triton bw % copy >= 60% (bytes the kernels must move, per second)")
    ls = res.get("linear_step")
    if isinstance(ls, dict):
        lines.append(
            f"linear fwd+bwd {ls['shape_t_k_n']} ({ls['activation_dtype']}): bf16 "
            f"{ls['bf16_ms']:.2f} ms, fp32 {ls['fp32_ms']:.2f} ms, nvfp4 triton "
            f"{ls['nvfp4_triton_ms']:.2f} ms ({ls['nvfp4_triton_over_bf16']:.2f}x bf16), nvfp4 "
            f"eager {ls['nvfp4_eager_ms']:.2f} ms ({ls['nvfp4_eager_over_bf16']:.2f}x); goal "
            f"nvfp4/bf16 <= 1.3. With FP32 GEMMs instead of tensor cores: nvfp4 "
            f"{ls['nvfp4_fp32_gemms_ms']:.2f} ms ({ls['nvfp4_fp32_gemms_over_bf16']:.2f}x), fp32 "
            f"F.linear {ls['fp32_over_bf16']:.2f}x bf16. Tensor-core GEMMs vs FP32 reference: max "
            f"relative difference {ls['gemm_max_rel_diff']:.1e} (< 1e-5 expected)")
    lines += [f"{part}: FAILED: {res[part]}" for part in ("bits", "throughput", "linear_step")
              if isinstance(res.get(part), str)]
    return "\n".join(lines) + "\n"


def main() -> int:
    device = ARGS.device
    if device == "cuda" and not torch.cuda.is_available():
        print("triton_check: no CUDA device (use --device cpu to test this script)")
        return 1
    res = {"device": device, "tf32": torch.backends.cuda.matmul.allow_tf32,
           "device_name": torch.cuda.get_device_name() if device == "cuda" else "CPU interpreter"}
    try:
        import triton

        res["triton"] = triton.__version__
        from hymoe.precision import triton_kernels as tk
    except (ImportError, RuntimeError) as e:
        print(f"triton_check: FAILED: triton kernels not importable: {e}")
        return 1
    ok = True
    repeats = ARGS.repeats if device == "cuda" else 2
    for part, fn in (("bits", lambda: check_bits(tk, device)),
                     ("throughput", lambda: check_throughput(tk, device, repeats)),
                     ("linear_step", lambda: check_linear_step(tk, device, repeats))):
        t0 = time.monotonic()
        try:
            res[part] = fn()
        except Exception as e:  # noqa: BLE001 - report, go on with the next part
            traceback.print_exc()
            res[part] = f"{type(e).__name__}: {e}"
            ok = False
        print(f"[triton-check] {part}: {time.monotonic() - t0:.1f} s", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    if isinstance(res.get("bits"), dict) and res["bits"]["mismatches"]:
        ok = False
    if isinstance(res.get("linear_step"), dict) and res["linear_step"]["gemm_max_rel_diff"] > 1e-5:
        ok = False
    res["ok"] = ok
    text = render(res)
    print(text, end="")
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump({**res, "text": text}, f, indent=1)
    print("triton-check: ok" if ok else "triton-check: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
