"""The Mamba-2 fast path on a GPU (one step of `make gpu-check`): mamba-ssm's Triton SSD scan
against hymoe's own, results and speed.

    python benchmarks/ssd_kernels_check.py [--json out.json]        # CUDA
    python benchmarks/ssd_kernels_check.py --device cpu             # CPU: Triton's interpreter,
                                                                    # small cases, no timing worth
                                                                    # reading (tests/test_ssd_kernels.py)

Every comparison calls hymoe.model.ssd_kernels.ssd_chunk_scan (what the Mamba mixer calls; on CUDA
it dispatches to mamba-ssm's ``mamba_chunk_scan_combined``) and hymoe.model.ssd.ssd_chunk_scan on
the same inputs, and compares the output, the final state where asked, and the gradient of every
input, each as max |fast - hymoe| / max |hymoe|:
1. mapping: the argument mapping, in fp32 on small cases: documents (seq_idx) with boundaries inside
   and at the edge of a chunk, D per head and per channel, dt_bias, softplus, a dt clamp that bites,
   initial and final states with documents not numbered from 0, the output gate z.
2. nano: one Nemotron 3 Nano Mamba layer at TP=1 (64 heads x 64, 8 groups, state 128, chunk 128;
   2 x 4096 tokens with documents) in bf16 (the training dtype) and fp32.
3. timing: forward + backward of both at the nano shape in bf16, medians of CUDA-event-timed calls
   after warm-up (which holds mamba-ssm's autotuning); and causal-conv1d's kernel against hymoe's
   conv where its CUDA extension loads (the GPU machines have no build of it: reported, not failed).
Tolerances: 1e-5 in the interpreter (numpy fp32); on CUDA 5e-3 in fp32 (Triton's fp32 dots use TF32)
and 5e-2 in bf16 (mamba-ssm also keeps the states passed between chunks in bf16). On CUDA the fp32
runs use each autotuned kernel's smallest config: tuning every kernel again for fp32 would cost a
minute of compiling, and the config changes the speed, not the arithmetic. Each part reports and the
script goes on if one raises; the exit status is 1 if any part raised or missed its tolerance.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
import types


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--repeats", type=int, default=10)
    return p.parse_args(argv)


ARGS = _parse(sys.argv[1:] if __name__ == "__main__" else [])
if ARGS.device == "cpu":
    # Before triton is imported: triton.language's own @jit helpers (tl.cumsum's combine function)
    # are decorated then, and a compiled one cannot be called from an interpreted kernel.
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402 - after TRITON_INTERPRET is set
from hymoe.model import ssd, ssd_kernels  # noqa: E402
from triton_check import timed  # noqa: E402 - this folder: the timing of the quantization check

# (batch, length, heads, head_dim, groups, state, chunk)
SMALL = {"cpu": (2, 40, 4, 8, 2, 8, 16),
         # Nano's per-layer dims, so that mamba-ssm's autotuning keys are the nano run's.
         "cuda": (2, 300, 64, 64, 8, 128, 128)}
NANO = (2, 4096, 64, 64, 8, 128, 128)
TOL = {("cpu", torch.float32): 1e-5, ("cuda", torch.float32): 5e-3, ("cuda", torch.bfloat16): 5e-2}


def seq_idx_for(b, L, q, first=0):
    """Row 0: documents changing inside a chunk, at a chunk edge and inside the next; row 1: two
    documents numbered from ``first``, the second starting in the last chunk; others: one."""
    rows = []
    for r in range(b):
        cuts = ([q // 2 + 1, q, q + q // 2 + 3] if r == 0 else [L - 7] if r == 1 else [])
        row = torch.zeros(L, dtype=torch.long)
        for c in (c for c in cuts if 0 < c < L):
            row[c:] += 1
        rows.append(row + (first if r == 1 else 0))
    return torch.stack(rows)


def make_inputs(shape, dtype, device, seed, *, d_per_channel=False, z=False, init=False):
    b, L, h, p, g, n, _ = shape
    gen = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0, shift=0.0, dt=dtype):
        t = torch.randn(*s, generator=gen) * scale + shift
        return t.to(device=device, dtype=dt).requires_grad_()

    t = {"x": r(b, L, h, p), "dt": r(b, L, h, shift=-1.0),
         "A": (-torch.rand(h, generator=gen) - 0.3).to(device).requires_grad_(),
         "B": r(b, L, g, n, scale=0.5), "C": r(b, L, g, n, scale=0.5),
         # Parameters stay fp32 in the mixer whatever the activations' dtype.
         "D": r(h, p, dt=torch.float32) if d_per_channel else r(h, dt=torch.float32),
         "dt_bias": r(h, scale=0.3, dt=torch.float32)}
    if z:
        t["z"] = r(b, L, h, p)
    if init:
        t["initial_states"] = r(b, h, p, n, scale=0.5, dt=torch.float32)
    return t


def cases(shape, device):
    b, L, q = shape[0], shape[1], shape[6]
    return {
        "documents, dt clamp": (
            make_inputs(shape, torch.float32, device, 0),
            {"dt_limit": (0.05, 0.6), "seq_idx": seq_idx_for(b, L, q).to(device)}),
        "states, gate, D[H,P]": (
            make_inputs(shape, torch.float32, device, 1, d_per_channel=True, z=True, init=True),
            {"seq_idx": seq_idx_for(b, L, q, first=3).to(device), "return_final_states": True}),
    }


def run(scan, t, q, **kw):
    """Outputs and the gradient of every input for a fixed random cotangent."""
    args = {k: v for k, v in t.items() if k not in ("x", "dt", "A", "B", "C")}
    out = scan(t["x"], t["dt"], t["A"], t["B"], t["C"], q, dt_softplus=True, **args, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(99)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs)
    grads = torch.autograd.grad(loss, list(t.values()))
    names = ["y", "final_state"][: len(outs)]
    return {**dict(zip(names, outs)), **{f"d{k}": g for k, g in zip(t, grads)}}


def compare(t, q, tol, **kw) -> dict:
    fast, ref = run(ssd_kernels.ssd_chunk_scan, t, q, **kw), run(ssd.ssd_chunk_scan, t, q, **kw)
    rel = {}
    for name, b in ref.items():
        a = fast[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            raise AssertionError(f"{name}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}")
        scale = b.float().abs().max().item() or 1.0
        rel[name] = (a.float() - b.float()).abs().max().item() / scale
    return {"max_rel": rel, "tol": tol, "ok": all(v <= tol for v in rel.values())}


def check_mapping(device) -> dict:
    shape = SMALL[device]
    return {name: compare(t, shape[6], TOL[(device, torch.float32)], **kw)
            for name, (t, kw) in cases(shape, device).items()}


def check_nano(device, dtype) -> dict:
    shape = NANO if device == "cuda" else SMALL["cpu"]
    t = make_inputs(shape, dtype, device, 2)
    seq_idx = seq_idx_for(shape[0], shape[1], shape[6]).to(device)
    return {"shape": shape, **compare(t, shape[6], TOL[(device, dtype)], seq_idx=seq_idx)}


def check_timing(device, repeats) -> dict:
    shape = NANO if device == "cuda" else SMALL["cpu"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t = make_inputs(shape, dtype, device, 3)
    seq_idx = seq_idx_for(shape[0], shape[1], shape[6]).to(device)
    gy = torch.randn(t["x"].shape, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    res = {"shape": shape, "dtype": str(dtype).removeprefix("torch.")}
    for name, scan in (("mamba_ssm", ssd_kernels.ssd_chunk_scan), ("hymoe", ssd.ssd_chunk_scan)):

        def step(scan=scan):
            y = scan(t["x"], t["dt"], t["A"], t["B"], t["C"], shape[6], D=t["D"],
                     dt_bias=t["dt_bias"], dt_softplus=True, seq_idx=seq_idx)
            torch.autograd.grad(y, list(t.values()), gy)

        res[f"{name}_ms"] = 1e3 * timed(step, device, repeats, warmup=2 if device == "cuda" else 0)
    res["speedup"] = res["hymoe_ms"] / res["mamba_ssm_ms"]
    return res


def check_conv(device, k) -> dict | str:
    if k.conv is None:
        return f"not run: {k.conv_reason}"
    b, L, h, p, g, n, q = NANO
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(4)
        x = torch.randn(b, L, h * p + 2 * g * n, generator=gen).to(device, dtype).requires_grad_()
        w = torch.randn(x.shape[-1], 4, generator=gen).to(device, dtype).requires_grad_()
        bias = torch.randn(x.shape[-1], generator=gen).to(device, dtype).requires_grad_()
        seq_idx = seq_idx_for(b, L, q).to(device)
        outs = []
        for fn in (ssd_kernels.causal_conv1d, ssd.causal_conv1d):
            y = fn(x, w, bias, seq_idx=seq_idx, activation="silu")
            outs.append([y, *torch.autograd.grad(y.float().square().sum(), (x, w, bias))])
        rel = max((a.float() - r.float()).abs().max().item() / (r.float().abs().max().item() or 1)
                  for a, r in zip(*outs))
        tol = TOL[(device, dtype)]
        res[str(dtype).removeprefix("torch.")] = {"max_rel": rel, "tol": tol, "ok": rel <= tol}
    return res


def _cpu_interpreter_setup() -> ssd_kernels.Kernels:
    """mamba-ssm's kernels on CPU tensors in Triton's interpreter, with three CPU stand-ins."""
    from triton.runtime import autotuner, interpreter

    # Its launchers enter torch.cuda.device(t.device.index) and read the SM count.
    torch.cuda.device = lambda index: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda d: types.SimpleNamespace(multi_processor_count=4)
    # triton 3.6's interpreter takes int() of a one-element array for a scalar's __index__, which
    # numpy >= 2.4 refuses.
    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_tensor_index
    k = ssd_kernels.load_kernels()
    _one_config(autotuner)  # the interpreter would time every config of every kernel
    # CPU tensors take hymoe's kernels; here the interpreted fast path is what is checked.
    ssd_kernels._kernels_for = lambda t: k
    return k


def _one_config(autotuner) -> None:
    """Each autotuned mamba-ssm kernel keeps only its smallest config (no more tuning)."""
    for name, module in list(sys.modules.items()):
        if name.startswith("mamba_ssm."):
            for value in vars(module).values():
                if isinstance(value, autotuner.Autotuner) and len(value.configs) > 1:
                    value.configs = [min(value.configs, key=lambda c: (
                        math.prod(c.kwargs.values()) * (c.num_stages or 1)))]


def render(res) -> str:
    where = "cpu, Triton's interpreter" if res["device"] == "cpu" else res["device"]
    lines = [f"ssd-kernels ({where}): {res.get('kernels', '?')}"]

    def row(label, r):
        if isinstance(r, str):
            return f"  {label}: FAILED: {r}"
        worst = max(r["max_rel"], key=r["max_rel"].get)
        return (f"  {label}: {'ok' if r['ok'] else 'OVER TOLERANCE'}, worst {worst} "
                f"{r['max_rel'][worst]:.2e} (tol {r['tol']:.0e})")

    mapping = res.get("mapping")
    for name, r in (mapping.items() if isinstance(mapping, dict) else [("mapping", mapping)]):
        lines.append(row(f"mapping fp32 [{name}]", r))
    for key in ("nano_bf16", "nano_fp32"):
        if key in res:
            lines.append(row(f"{key} {NANO}", res[key]))
    tm = res.get("timing")
    if isinstance(tm, dict):
        lines.append(f"  fwd+bwd {tm['shape']} {tm['dtype']}: mamba-ssm {tm['mamba_ssm_ms']:.2f} ms, "
                     f"hymoe {tm['hymoe_ms']:.2f} ms ({tm['speedup']:.1f}x)"
                     + (" [interpreter: not a speed]" if res["device"] == "cpu" else ""))
    elif tm is not None:
        lines.append(f"  timing: FAILED: {tm}")
    conv = res.get("conv")
    if isinstance(conv, dict):
        lines += [row(f"conv1d {k}", {**v, "max_rel": {"all": v["max_rel"]}})
                  for k, v in conv.items()]
    elif conv is not None:
        lines.append(f"  conv1d: {conv}")
    return "\n".join(lines) + "\n"


def main() -> int:
    device = ARGS.device
    if device == "cuda" and not torch.cuda.is_available():
        print("ssd_kernels_check: no CUDA device (use --device cpu to test this script)")
        return 1
    res = {"device": device}
    try:
        k = _cpu_interpreter_setup() if device == "cpu" else ssd_kernels.kernels()
    except (ImportError, RuntimeError) as e:  # triton itself missing or broken
        k = ssd_kernels.Kernels(None, None, f"{type(e).__name__}: {e}", "")
    res["kernels"] = k.describe()
    if k.scan is None or (device == "cuda" and ssd_kernels._mode != "auto"):
        print(render(res), end="")
        print("ssd-kernels-check: FAILED: the fast path is not in use")
        return 1
    repeats = ARGS.repeats if device == "cuda" else 1
    parts = [("nano_bf16", lambda: check_nano(device, torch.bfloat16)),
             ("timing", lambda: check_timing(device, repeats))]
    if device == "cuda":  # after the bf16 runs, which tune the kernels; fp32 takes no tuning
        parts.append(("_one_config", lambda: _one_config(sys.modules["triton"].runtime.autotuner)))
    parts += [("mapping", lambda: check_mapping(device)),
              ("nano_fp32", lambda: check_nano(device, torch.float32)),
              ("conv", lambda: check_conv(device, k))]
    if device == "cpu":  # the interpreter has no bf16 dots worth checking, and is slow
        parts = [p for p in parts if p[0] in ("mapping", "timing")]
    ok = True
    for part, fn in parts:
        t0 = time.monotonic()
        try:
            out = fn()
            if part.startswith("_"):
                continue
            res[part] = out
        except Exception as e:  # noqa: BLE001 - report, go on with the next part
            traceback.print_exc()
            res[part] = f"{type(e).__name__}: {e}"
            ok = False
        print(f"[ssd-kernels-check] {part}: {time.monotonic() - t0:.1f} s", flush=True)
    verdicts = [r["ok"] for r in res.get("mapping", {}).values()] if isinstance(
        res.get("mapping"), dict) else []
    verdicts += [res[p]["ok"] for p in ("nano_bf16", "nano_fp32") if isinstance(res.get(p), dict)]
    if isinstance(res.get("conv"), dict):
        verdicts += [v["ok"] for v in res["conv"].values()]
    res["ok"] = ok = ok and all(verdicts)
    text = render(res)
    print(text, end="")
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump({**res, "text": text}, f, indent=1)
    print("ssd-kernels-check: ok" if ok else "ssd-kernels-check: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
