"""Step time and memory vs sequence length for each layer type of the tiny model on CPU: Mamba-2
grows linearly with the sequence, attention quadratically — the reason a hybrid with few attention
layers reaches 1M tokens.

The tiny recipe's model (``M*EM-E``, fp32, micro-batch 1) is built once; each layer type is then
run alone — ``M`` Mamba-2, ``*`` attention (causal), ``E`` MoE, ``-`` dense MLP, each with its
norm — forward and backward on a random ``[L, 1, hidden]`` input, and so is the whole model
(embedding → 6 layers → output layer and loss, ``model.loss_chunk_tokens`` = 4096). Per length:
the CPU time of the best of ``--repeats`` passes after one warm-up, on one thread (the machines
are shared: CPU time counts the work, not the waiting, and the best pass is the least disturbed),
its wall time beside it, and the peak bytes torch's CPU allocator holds during one
pass (torch profiler memory events). Each series is fitted with a + b·L + c·L², and the log-log
slope between the two longest lengths is printed: ≈ 1 linear, ≈ 2 quadratic.

    python benchmarks/long_context_scaling.py [--lengths 1024,2048,4096,8192] [--repeats 3]
        [--out docs/img]   # → long_context_scaling.png and .json

Attention is hymoe's core attention over PyTorch's scaled-dot-product kernel: quadratic work,
but no L × L score matrix kept, so its memory grows linearly too. (With document masks, the
boolean L × L mask is the one quadratic tensor: 1 GiB at 32k.)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

VOCAB = 2048  # the demo corpus's tokenizer
PATTERN = "M*EM-E"
SERIES = {"M": "Mamba-2 layer", "*": "attention layer", "E": "MoE layer", "-": "MLP layer",
          "model": "whole tiny model (6 layers)"}


def build():
    from hymoe.model import hf
    from hymoe.train.recipe import load_recipe

    cfg = load_recipe("tiny", ["data.path=unused", "model.max_sequence_length=1048576",
                               "model.loss_chunk_tokens=4096"]).model
    assert cfg.pattern == PATTERN, cfg.pattern
    model = hf.build_single_process(cfg, VOCAB, seed=0)
    for mixer in model._mamba_mixers():
        mixer.seq_idx = None  # one causal stream (the model's forward sets this per batch)
    return model


def passes(model, L: int) -> dict:
    """name → a function running one forward + backward at length L."""
    g = torch.Generator().manual_seed(L)
    data = torch.randint(2, VOCAB, (1, L + 1), generator=g)
    h = model.config.hidden_size
    x = torch.randn(L, 1, h, generator=g)
    dy = torch.randn(L, 1, h, generator=g)

    def whole():
        model.zero_grad(set_to_none=True)
        model(data[:, :-1], None, None, labels=data[:, 1:]).sum().backward()

    def layer(module):
        def run():
            model.zero_grad(set_to_none=True)
            inp = x.clone().requires_grad_()
            out = module(hidden_states=inp, attention_mask=None)
            out = out[0] if isinstance(out, tuple) else out
            (out * dy).sum().backward()
        return run

    layers = model.decoder.layers
    runs = {sym: layer(layers[PATTERN.index(sym)]) for sym in "M*E-"}
    runs["model"] = whole
    return runs


def peak_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def measure(model, lengths: list[int], repeats: int) -> dict:
    rows = {name: [] for name in SERIES}
    for L in lengths:
        for name, fn in passes(model, L).items():
            fn()  # warm-up: allocator growth, first-call overheads
            cpu, wall = [], []
            for _ in range(repeats):
                c0, w0 = time.process_time(), time.perf_counter()
                fn()
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
            mem = peak_bytes(fn)
            rows[name].append({"length": L, "cpu_s": min(cpu), "wall_s": min(wall),
                               "peak_mib": mem / 2**20})
            print(f"  L={L:6d} {SERIES[name]:28s} cpu {min(cpu) * 1e3:9.1f} ms  wall "
                  f"{min(wall) * 1e3:9.1f} ms  peak {mem / 2**20:8.1f} MiB", flush=True)
    return rows


def fit(rows: list[dict], key: str) -> dict:
    L = np.array([r["length"] for r in rows], dtype=float)
    y = np.array([r[key] for r in rows], dtype=float)
    a, b, c = np.linalg.lstsq(np.stack([np.ones_like(L), L, L**2], 1), y, rcond=None)[0]
    slope = float(np.log(y[-1] / y[-2]) / np.log(L[-1] / L[-2])) if len(L) > 1 else float("nan")
    return {"a": float(a), "b_per_token": float(b), "c_per_token2": float(c), "loglog_slope_last": slope}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "cpu_s", "forward + backward, CPU seconds (1 thread)"),
                           (axes[1], "peak_mib", "peak allocator memory (MiB)")):
        for name, res in results["series"].items():
            L = [r["length"] for r in res["rows"]]
            ax.plot(L, [r[key] for r in res["rows"]], "o-" if name != "model" else "s--",
                    label=SERIES[name])
        L0 = np.array([r["length"] for r in next(iter(results["series"].values()))["rows"]], float)
        ref = results["series"]["M"]["rows"][0][key]
        ax.plot(L0, ref * L0 / L0[0], ":", color="grey", label="∝ L")
        ax.plot(L0, ref * (L0 / L0[0]) ** 2, "--", color="grey", label="∝ L²")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("tiny model (hidden 64) on CPU, micro-batch 1, fp32: forward + backward of each layer "
                 "type alone, and of the whole model", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="docs/img")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.set_num_threads(1)
    results = {"lengths": lengths, "repeats": args.repeats, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "machine": platform.machine(), "series": {}}
    for name, rows in measure(build(), lengths, args.repeats).items():
        results["series"][name] = {"rows": rows, "time_fit": fit(rows, "cpu_s"),
                                   "memory_fit": fit(rows, "peak_mib")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_context_scaling.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "long_context_scaling.png")
    for name, res in results["series"].items():
        print(f"{SERIES[name]:28s} log-log slope over the last doubling: time "
              f"{res['time_fit']['loglog_slope_last']:.2f}, memory {res['memory_fit']['loglog_slope_last']:.2f}")
    print(f"wrote {out / 'long_context_scaling.png'} and {out / 'long_context_scaling.json'}")


if __name__ == "__main__":
    main()
