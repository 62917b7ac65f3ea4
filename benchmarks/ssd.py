"""Mamba-2 SSD scan, forward + backward: hymoe's chunked scan (hymoe.model.ssd) vs transformers'
NemotronH PyTorch path (``mamba2_chunk_scan``, what HF runs without mamba-ssm) and, where the
mamba-ssm sources are installed, its ``ssd_minimal_discrete`` — same inputs, in one run.

Each implementation runs ``--repeats`` forward+backward passes after one warm-up, interleaved with
the others so that a noisy shared machine slows them alike; the speed-up is taken on the best
(minimum) time of each, which other processes can only make worse; the median is printed too.
On CPU the process CPU time (all threads) is recorded beside the wall time: other processes
taking the cores stretch the wall time but not the CPU time, so on a crowded machine its ratio is
the steadier one (``--threads 1`` removes the threads' wait time from it as well).
Before timing, the output and every input gradient are compared with transformers' (max abs
difference relative to the largest value): "equal results" is part of the measurement.

    python benchmarks/ssd.py [--device cpu|cuda] [--repeats 5] [--shapes small,nano_2k,long_8k]
                             [--threads N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

# name: (batch, length, heads, head_dim, groups, state, chunk)
SHAPES = {
    "small": (2, 512, 8, 16, 2, 32, 64),
    # One Nemotron 3 Nano Mamba layer at TP=1 (64 heads × 64, 8 groups, state 128, chunk 128).
    "nano_2k": (1, 2048, 64, 64, 8, 128, 128),
    "long_8k": (1, 8192, 16, 64, 4, 128, 128),
}


def make_inputs(shape, device, seed=0):
    b, L, h, p, g, n, _ = shape
    gen = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=gen) * scale + shift).to(device).requires_grad_()

    A = (-torch.rand(h, generator=gen) - 0.3).to(device).requires_grad_()
    return {"x": r(b, L, h, p), "dt": r(b, L, h, shift=-2.0), "A": A,
            "B": r(b, L, g, n, scale=0.5), "C": r(b, L, g, n, scale=0.5), "D": r(h),
            "dt_bias": r(h, scale=0.3)}


def _ssd_chunk_scan():
    try:
        from hymoe.model.ssd import ssd_chunk_scan
    except ImportError:  # a checkout without `pip install -e .` (e.g. a bare GPU machine)
        path = Path(__file__).resolve().parents[1] / "model" / "ssd.py"
        spec = importlib.util.spec_from_file_location("_hymoe_ssd", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        ssd_chunk_scan = module.ssd_chunk_scan
    return ssd_chunk_scan


def ours(t, chunk):
    return _ssd_chunk_scan()(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=chunk, D=t["D"],
                          dt_bias=t["dt_bias"], dt_softplus=True)


def transformers_path(t, chunk):
    from transformers.models.nemotron_h.modeling_nemotron_h import mamba2_chunk_scan

    return mamba2_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=chunk, D=t["D"],
                             dt_bias=t["dt_bias"], dt_softplus=True)


def load_ssd_minimal():
    """mamba-ssm's ssd_minimal_discrete, loaded from its file: the package's __init__ imports the
    CUDA extension, which is absent on CPU machines (and often on GPU ones)."""
    try:
        spec = importlib.util.find_spec("mamba_ssm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "modules" / "ssd_minimal.py"
    if not path.exists():
        return None
    module_spec = importlib.util.spec_from_file_location("_ssd_minimal", path)
    module = importlib.util.module_from_spec(module_spec)
    # The file also imports the Triton scan for its own test; a stand-in module keeps that import
    # (and the package __init__ behind it) from loading the CUDA extension.
    fused = "mamba_ssm.ops.triton.ssd_combined"
    saved = sys.modules.get(fused)
    stub = types.ModuleType(fused)
    stub.mamba_chunk_scan_combined = None
    sys.modules[fused] = stub
    try:
        module_spec.loader.exec_module(module)
    except ImportError as err:  # e.g. einops missing
        print(f"mamba-ssm's ssd_minimal not loadable: {err}")
        return None
    finally:
        if saved is None:
            del sys.modules[fused]
        else:
            sys.modules[fused] = saved
    return module.ssd_minimal_discrete


def minimal_path(fn):
    import torch.nn.functional as F

    def run(t, chunk):
        h = t["x"].shape[2]
        dt = F.softplus(t["dt"] + t["dt_bias"])
        rep = h // t["B"].shape[2]
        B = t["B"].repeat_interleave(rep, dim=2)
        C = t["C"].repeat_interleave(rep, dim=2)
        y, _ = fn(t["x"] * dt[..., None], t["A"] * dt, B, C, chunk)
        return y + t["x"] * t["D"][:, None]

    return run


def fwd_bwd(fn, t, chunk, grad_out):
    for v in t.values():
        v.grad = None
    y = fn(t, chunk)
    (y * grad_out).sum().backward()
    return y


def compare(a_fn, b_fn, shape, device):
    """max |a − b| / max |b| over the output and every input gradient."""
    chunk = shape[-1]
    ta, tb = make_inputs(shape, device), make_inputs(shape, device)
    g = torch.randn(shape[:2] + shape[2:4], generator=torch.Generator().manual_seed(1)).to(device)
    ya, yb = fwd_bwd(a_fn, ta, chunk, g), fwd_bwd(b_fn, tb, chunk, g)
    worst = (ya - yb).abs().max().item() / yb.abs().max().item()
    for k in ta:
        worst = max(worst, (ta[k].grad - tb[k].grad).abs().max().item()
                    / tb[k].grad.abs().max().item())
    return worst


def time_all(fns: dict, shape, device, repeats) -> dict:
    chunk = shape[-1]
    t = make_inputs(shape, device)
    g = torch.randn(shape[:2] + shape[2:4], generator=torch.Generator().manual_seed(1)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fwd_bwd(fn, t, chunk, g)
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            fwd_bwd(fn, t, chunk, g)
            sync()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: (min(v), statistics.median(v), min(cpu[name])) for name, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fns = {"hymoe": ours, "transformers": transformers_path}
    minimal = load_ssd_minimal()
    if minimal is not None:
        fns["mamba_ssm_minimal"] = minimal_path(minimal)
    else:
        print("mamba-ssm not installed: ssd_minimal_discrete left out")
    # The load average says how shared the machine was: best-of-N copes with noise, not with a
    # machine that never had the cores free.
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    rows = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        diff = compare(ours, transformers_path, shape, args.device)
        t = time_all(fns, shape, args.device, args.repeats)
        row = {"shape": name, "b_L_H_P_G_N_chunk": shape, "max_rel_diff_vs_transformers": diff,
               **{f"{k}_best_s": v[0] for k, v in t.items()},
               **{f"{k}_median_s": v[1] for k, v in t.items()},
               **{f"{k}_cpu_best_s": v[2] for k, v in t.items()},
               "speedup_vs_transformers": t["transformers"][0] / t["hymoe"][0],
               "cpu_speedup_vs_transformers": t["transformers"][2] / t["hymoe"][2]}
        rows.append(row)
        print(json.dumps(row))
    extra = " mamba-ssm minimal |" if "mamba_ssm_minimal" in fns else ""
    print("\n| shape (b, L, H, P, G, N, chunk) | hymoe fwd+bwd best / median | transformers |"
          f"{extra} speed-up (wall) | speed-up (CPU time) | max rel. diff |")
    print("| --- | --- | --- |" + (" --- |" if extra else "") + " --- | --- | --- |")
    for r in rows:
        cells = [f"{r[k + '_best_s'] * 1e3:.0f} / {r[k + '_median_s'] * 1e3:.0f} ms"
                 for k in fns]
        speedup, diff = r["speedup_vs_transformers"], r["max_rel_diff_vs_transformers"]
        print(f"| {r['shape']} {tuple(r['b_L_H_P_G_N_chunk'])} | " + " | ".join(cells)
              + f" | {speedup:.2f}× | {r['cpu_speedup_vs_transformers']:.2f}× | {diff:.1e} |")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
