"""Memory and time of `hymoe convert to-hf`: the layer-by-layer conversion (``checkpoint_to_hf``:
one layer and one output shard in memory) against loading the whole model first and writing it
(what a converter without streaming does: the model, then its converted copy), each in a fresh
process, on the same dist-checkpoint, in one run. Memory is the peak resident set above the
process's resident set just before the conversion, as a multiple of the model's fp32 bytes; both
outputs must hold the same tensors, bit for bit.

    python benchmarks/convert.py [--layers 24 48] [--hidden 512] [--shard-mb 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
VOCAB = 4096


def model_config(layers: int, hidden: int):
    from hymoe.model.config import ModelConfig

    # Mamba, MoE and MLP layers in turn: every kind of weight the conversion renames.
    pattern = ("ME-" * layers)[:layers]
    return ModelConfig(pattern=pattern, hidden_size=hidden, ffn_hidden_size=4 * hidden,
                       num_attention_heads=8, num_query_groups=2, head_dim=hidden // 8,
                       mamba_num_heads=hidden // 32, mamba_head_dim=64, mamba_num_groups=2,
                       num_experts=8, moe_ffn_hidden_size=hidden,
                       moe_shared_expert_intermediate_size=hidden)


def _status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process. Not ru_maxrss: Linux keeps
    that across exec, so a child would inherit its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(mode: str, checkpoint: str, out: str, layers: int, hidden: int, shard_bytes: int):
    """One conversion in this (fresh) process; prints {"peak_bytes", "seconds"} as JSON."""
    import torch

    from hymoe.model import hf

    cfg = model_config(layers, hidden)
    # Imports, shared libraries and process groups outside the measurement.
    import torch.distributed.checkpoint  # noqa: F401
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import torch as _  # noqa: F401

    with torch.device("meta"):
        hf.build_single_process(cfg, VOCAB, initialize=False)
    before, t0 = _status_bytes("VmRSS"), time.perf_counter()
    if mode == "streaming":
        hf.checkpoint_to_hf(checkpoint, cfg, VOCAB, out, max_shard_bytes=shard_bytes)
    else:
        model = hf.build_single_process(cfg, VOCAB, initialize=False)
        with torch.no_grad():
            state = dist_checkpointing.load({"model": model.sharded_state_dict()}, checkpoint)
        model.load_state_dict(state["model"])
        hf.to_hf(model, out, max_shard_bytes=shard_bytes)
    seconds = time.perf_counter() - t0
    print(json.dumps({"peak_bytes": _status_bytes("VmHWM") - before, "seconds": seconds}))


def measure(workdir: Path, layers: int = 24, hidden: int = 512, shard_mb: float = 64) -> dict:
    """Save a checkpoint of the model, convert it both ways in fresh processes; the numbers."""
    import torch

    from hymoe.model import hf
    from hymoe.train import checkpoint as ckpt

    model = hf.build_single_process(model_config(layers, hidden), VOCAB, seed=0)
    model_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values()
                      if isinstance(p, torch.Tensor))
    ckpt.save_model_weights([model], workdir / "ckpt")
    del model
    result = {"layers": layers, "hidden": hidden, "model_bytes": model_bytes,
              "shard_bytes": int(shard_mb * 2**20)}
    for mode in ("streaming", "whole"):
        r = subprocess.run(
            [sys.executable, __file__, "--child", mode, str(workdir / "ckpt"), str(workdir / mode),
             "--layers", str(layers), "--hidden", str(hidden), "--shard-mb", str(shard_mb)],
            capture_output=True, text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
        if r.returncode != 0:
            raise RuntimeError(f"{mode} conversion failed:\n{r.stderr[-4000:]}")
        result[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    a, b = hf.read_hf_state(workdir / "streaming"), hf.read_hf_state(workdir / "whole")
    result["identical"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[24, 48])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--shard-mb", type=float, default=64, help="output shard size (default 64 MiB)")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "CKPT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, checkpoint, out = args.child
        _child(mode, checkpoint, out, args.layers[0], args.hidden, int(args.shard_mb * 2**20))
        return
    print(f"hidden {args.hidden}, output shards of {args.shard_mb:g} MiB")
    print("| layers | model fp32 (MiB) | conversion | peak memory above start (MiB) | × model | seconds |")
    print("| ---: | ---: | --- | ---: | ---: | ---: |")
    for layers in args.layers:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(Path(tmp), layers, args.hidden, args.shard_mb)
        if not r["identical"]:
            sys.exit(f"{layers} layers: the two conversions wrote different tensors")
        mb = r["model_bytes"] / 2**20
        for mode, name in (("streaming", "hymoe `convert to-hf` (layer by layer)"),
                           ("whole", "whole model loaded, then written")):
            peak = r[mode]["peak_bytes"] / 2**20
            print(f"| {layers} | {mb:.0f} | {name} | {peak:.0f} | {peak / mb:.2f} | "
                  f"{r[mode]['seconds']:.1f} |")


if __name__ == "__main__":
    main()
