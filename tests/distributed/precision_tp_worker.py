"""Worker for tests/test_precision_tp.py (run by torchrun over gloo, 2 processes).

Builds megatron-core's ColumnParallelLinear -> RowParallelLinear (no bias) for each case — TP=1
(each rank on its own, dp=2), TP=2, TP=2 with sequence parallelism — swaps their GEMMs for the
emulated NVFP4 ones exactly as ``precision.apply`` does (``_quantized_forward_impl``), runs forward
and backward, and compares output, input gradient and both weight gradients with ``reference``:
a single-process computation written from the contract (/work/shared/nvfp4.md), with the full
weights, that quantizes each GEMM's operands as the local GEMM sees them — weights, the column
layer's dy and the row layer's x per TP shard, with the shard's own amax (what Transformer Engine
does: no amax reduction for them); a sequence-parallel input after its all-gather, i.e. with the
whole tensor's amax (TE reduces that amax over the TP group) — in float32. Stochastic rounding is
off (it draws per rank); RHT is deterministic and runs both ways.

Writes <workdir>/rank<r>.json: {case: {tensor: max |diff|, "equal": bool, ...}}.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from hymoe.parallel.layout import ParallelConfig
from hymoe.parallel.setup import init_distributed, initialize_model_parallel
from hymoe.precision import nvfp4
from hymoe.precision.apply import _quantized_forward_impl
from hymoe.precision.emulated_linear import NVFP4Recipe
from hymoe.precision.rng import StochasticRoundingRNG
from hymoe.precision.telemetry import Telemetry

SEQ, BATCH, HIDDEN, FFN, OUT = 32, 2, 64, 96, 48
CASES = {
    "tp1": (1, False, True),
    "tp1_rht": (1, False, False),
    "tp2": (2, False, True),
    "tp2_rht": (2, False, False),
    "tp2_sp": (2, True, True),
    "tp2_sp_rht": (2, True, False),
}


def data():
    """Full weights, input and output gradient, the same on every rank. The two halves of each
    weight get different scales, so per-shard and whole-tensor amaxes differ."""
    g = torch.Generator().manual_seed(7)
    w1 = torch.randn(FFN, HIDDEN, generator=g) / HIDDEN**0.5
    w1[FFN // 2 :] *= 3.0
    w2 = torch.randn(OUT, FFN, generator=g) / FFN**0.5
    w2[:, FFN // 2 :] *= 0.25
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    dy = torch.randn(SEQ, BATCH, OUT, generator=g)
    return w1, w2, x, dy


def _deq(t, **kw):
    return nvfp4.quantize(t, **kw).dequantize()


def _wgrad(dy, x, rht):
    """dW = dyᵀ·x over tokens, both operands 1D along the token dim (padded to 16), RHT'd."""
    pad = -dy.shape[0] % 16
    dyt, xt = F.pad(dy, (0, 0, 0, pad)).t(), F.pad(x, (0, 0, 0, pad)).t()
    return _deq(dyt, rht=rht) @ _deq(xt, rht=rht).t()


def reference(w1, w2, x, dy, tp, rht):
    """(y, dx, [dW1 shard per rank], [dW2 shard per rank]) with tokens flattened [T, ·]."""
    X, dY = x.reshape(-1, HIDDEN), dy.reshape(-1, OUT)
    n1 = FFN // tp
    w1s = [w1[r * n1 : (r + 1) * n1] for r in range(tp)]  # column-parallel: rows of W1
    w2s = [w2[:, r * n1 : (r + 1) * n1] for r in range(tp)]  # row-parallel: columns of W2
    # fprop. Column layer: the whole X (gathered, if sequence-parallel) times each W1 shard.
    y1 = [_deq(X) @ _deq(w, two_d=True).t() for w in w1s]
    # Row layer: each rank's partial product of its activation shard, summed over ranks.
    partial = [_deq(a) @ _deq(w, two_d=True).t() for a, w in zip(y1, w2s)]
    y = partial[0] if tp == 1 else partial[0] + partial[1]
    # dgrad / wgrad. The row layer sees the whole dY (replicated, or all-gathered under SP).
    dy1 = [_deq(dY) @ _deq(w, two_d=True) for w in w2s]
    dw2 = [_wgrad(dY, a, rht) for a in y1]
    # Column layer: each rank's dY1 shard, with its own amax; dX summed over ranks.
    dxs = [_deq(d) @ _deq(w, two_d=True) for d, w in zip(dy1, w1s)]
    dx = dxs[0] if tp == 1 else dxs[0] + dxs[1]
    dw1 = [_wgrad(d, X, rht) for d in dy1]
    return y, dx, dw1, dw2


def run_case(tp, sp, rht_off, rank):
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    initialize_model_parallel(ParallelConfig(tp=tp, sequence_parallel=sp), seed=1234)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    config = ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=sp,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
    )
    init = torch.nn.init.zeros_
    col = ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=init, bias=False)
    row = RowParallelLinear(
        FFN, OUT, config=config, init_method=init, bias=False, input_is_parallel=True,
        skip_bias_add=False,
    )
    w1, w2, x, dy = data()
    n1 = FFN // tp
    with torch.no_grad():
        col.weight.copy_(w1[tp_rank * n1 : (tp_rank + 1) * n1])
        row.weight.copy_(w2[:, tp_rank * n1 : (tp_rank + 1) * n1])
    recipe = NVFP4Recipe(disable_rht=rht_off, disable_stochastic_rounding=True)
    rng = StochasticRoundingRNG(0, rank=rank)
    tel = Telemetry(interval=1)
    col._forward_impl = _quantized_forward_impl("nvfp4", recipe, rng, name="col", telemetry=tel)
    row._forward_impl = _quantized_forward_impl("nvfp4", recipe, rng, name="row", telemetry=tel)

    s = SEQ // tp if sp else SEQ
    lo = tp_rank * s if sp else 0
    x_local = x[lo : lo + s].clone().requires_grad_()
    tel.start_step(1)
    y_local, _ = row(col(x_local)[0])
    y_local.backward(dy[lo : lo + s])
    rows = tel.end_step()

    ry, rdx, rdw1, rdw2 = reference(w1, w2, x, dy, tp, rht=not rht_off)
    tokens = slice(lo * BATCH, (lo + s) * BATCH)  # [s, b] flattened s-major
    got = {
        "y": (y_local.reshape(-1, OUT), ry[tokens]),
        "dx": (x_local.grad.reshape(-1, HIDDEN), rdx[tokens]),
        "dw1": (col.weight.grad, rdw1[tp_rank]),
        "dw2": (row.weight.grad, rdw2[tp_rank]),
    }
    out = {k: (a - b).abs().max().item() for k, (a, b) in got.items()}
    out["equal"] = all(torch.equal(a, b) for a, b in got.values())
    out["rel_to_y"] = (ry[tokens] - y_local.reshape(-1, OUT)).norm().item() / ry.norm().item()
    # What the TP=2 claim rules out: quantizing the full weights (one amax) gives other bits.
    if tp == 2:
        full_y = reference(w1, w2, x, dy, 1, rht=not rht_off)[0][tokens]
        out["differs_from_full_tensor_quantization"] = not torch.equal(full_y, ry[tokens])
    out["telemetry_rows"] = sorted(f"{r['layer']}:{r['gemm']}:{r['tensor']}" for r in rows)
    return out


def main():
    workdir = sys.argv[1]
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(CASES)
    rank, _ = init_distributed()
    torch.set_num_threads(1)
    results = {name: run_case(*CASES[name], rank) for name in names}
    with open(os.path.join(workdir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
