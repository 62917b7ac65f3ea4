"""Emulated quantized linear layer y = x·Wᵀ: NVFP4 or MXFP8 operands, FP32 accumulation.

Each of the three GEMMs of a linear layer quantizes its two operands from the high-precision
tensors (never re-quantizes a quantized tensor) and multiplies the dequantized values with FP32
accumulation (`gemm`: FP32 GEMMs on CPU, BF16 tensor cores on CUDA, the same values either way);
outputs are cast to the activation (y, dx) or weight (dW) dtype. Which operand gets what follows the
contract (/work/shared/nvfp4.md) and TE's `NVFP4BlockScaling` recipe:

| GEMM  | operand A                                  | operand B                        |
| fprop | x [T, K], 1D along K                       | W [N, K], 2D 16×16 tiles         |
| dgrad | dy [T, N], 1D along N, stochastic rounding | W, the same 2D-quantized values  |
| wgrad | dyᵀ [N, T], 1D along T, RHT, stochastic    | xᵀ [K, T], 1D along T, RHT       |

With `disable_2d_quantization` W is 1D along K for fprop and Wᵀ 1D along N for dgrad (TE's rowwise
and columnwise copies). MXFP8 quantizes every operand along its GEMM's contraction dim with TE's
"rceil" shared-exponent rule, and has no stochastic rounding or RHT.

"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from . import mxfp8, nvfp4
from .telemetry import Telemetry

FORMATS = ("nvfp4", "mxfp8", "bf16", "fp32", "none")
# Formats that run the GEMMs unquantized, in the operands' own dtype.
HIGH_PRECISION = ("bf16", "fp32", "none")
# False: FP32 GEMMs on CUDA too, the reference path of `gemm` (for checks and comparisons). Needs
# torch >= 2.8 for `torch.mm(..., out_dtype=torch.float32)` on BF16 operands; hymoe allows 2.6.
TENSOR_CORES = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 8)
# TE's MXFP8 kernels round the shared exponent up (`float_to_e8m0(amax/448)`); see mxfp8.py.
MXFP8_SCALING_MODE = "rceil"


@dataclasses.dataclass(frozen=True)
class NVFP4Recipe:
    """The switches of TE's `NVFP4BlockScaling` recipe (same names, same defaults: all on)."""

    disable_rht: bool = False
    disable_stochastic_rounding: bool = False
    disable_2d_quantization: bool = False


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad dim 0 of a 2-D tensor to a multiple (zero tokens add nothing to dyᵀ·x)."""
    extra = -t.shape[0] % multiple
    return F.pad(t, (0, 0, 0, extra)) if extra else t


def _check_gradient_not_zeroed(src: torch.Tensor, q, name: str) -> None:
    # A non-zero gradient that quantizes to all zeros is a quantizer bug (one TE release did this
    # with SR on one GPU family), not a result. _assert_async does not synchronise a CUDA stream.
    # Used when no Telemetry is attached; with one, the check names the layer and warns instead
    # (Telemetry.watch_gradient, reported once per step by Telemetry.end_step).
    if not src.numel():  # an expert that received no tokens
        return
    ok = (src.abs().amax() == 0) | q.any_nonzero()
    torch._assert_async(ok, f"{name}: a non-zero gradient quantized to all zeros")


class _Probe:
    """Where a GEMM reports to: the layer's name and the Telemetry (both optional)."""

    __slots__ = ("fmt", "name", "telemetry")

    def __init__(self, name: str | None, telemetry: Telemetry | None, fmt: str):
        self.name, self.telemetry, self.fmt = name or "<unnamed>", telemetry, fmt

    @property
    def measuring(self) -> bool:
        return self.telemetry is not None and self.telemetry.active

    def observe(self, gemm: str, tensor: str, src: torch.Tensor, q) -> None:
        if self.measuring:
            self.telemetry.observe(self.name, self.fmt, gemm, tensor, src, q)

    def gradient(self, where: str, src: torch.Tensor, q) -> None:
        if self.telemetry is not None:
            self.telemetry.watch_gradient(self.name, where, src, q)
        elif self.fmt == "nvfp4":
            _check_gradient_not_zeroed(src, q, where)


def gemm(a, b, *, ta: bool = False, tb: bool = False, tensor_cores: bool | None = None):
    """op(â)·op(b̂) in FP32 for two quantized operands (`NVFP4Tensor` or `MXFP8Tensor`), where op
    transposes when `ta`/`tb` is set.

    Reference (CPU; CUDA with `TENSOR_CORES = False`): the dequantized FP32 operands multiplied in
    FP32. With `tensor_cores` (the default on CUDA) the GEMM runs on BF16 tensor cores with FP32
    accumulation and output (`torch.mm(..., out_dtype=torch.float32)`, torch ≥ 2.8): MXFP8 values
    and NVFP4 block values (code × E4M3 scale, without the global decode scale D) are exact in BF16,
    and each NVFP4 operand's D then scales the FP32 output, as NVFP4 GEMMs apply global scales in
    their epilogue. The two differ only by FP32 rounding (tests/test_nvfp4_linear.py); an FP32 GEMM
    on a GPU would cost ~15x a BF16 one and dominate an emulated step. On CPU `tensor_cores=True`
    runs the same factored product with FP32 operands (CPU BF16 GEMMs round their output to BF16).
    """
    if tensor_cores is None:
        tensor_cores = TENSOR_CORES and a.scale.is_cuda
    if not tensor_cores:
        x, y = a.dequantize(), b.dequantize()
        return (x.t() if ta else x) @ (y.t() if tb else y)
    cuda = a.scale.is_cuda
    dtype = torch.bfloat16 if cuda else torch.float32
    x, y = (q.block_values(dtype) if isinstance(q, nvfp4.NVFP4Tensor) else q.dequantize(dtype)
            for q in (a, b))
    x, y = x.t() if ta else x, y.t() if tb else y
    if not x.numel() or not y.numel():  # an expert without tokens: an empty or all-zero product
        return torch.zeros(x.shape[0], y.shape[1], dtype=torch.float32, device=x.device)
    out = torch.mm(x, y, out_dtype=torch.float32) if cuda else x @ y
    for q in (a, b):
        if isinstance(q, nvfp4.NVFP4Tensor):  # one multiply each: D_a·D_b could underflow
            out = out * q.decode_scale
    return out


class QuantizedMatmul(torch.autograd.Function):
    """y = x·Wᵀ with emulated quantized GEMMs. x [T, K], W [N, K] -> y [T, N] in x's dtype.

    Saves the quantized (packed) operands that backward needs, as TE does, not the inputs.
    `generator` feeds the stochastic rounding of the gradients (dgrad draws, then wgrad draws).
    `probe` (a `_Probe`) carries the layer name and telemetry; None reports nothing.
    """

    @staticmethod
    def forward(ctx, x, weight, fmt: str, recipe: NVFP4Recipe, generator, probe=None):
        if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
            raise ValueError(
                f"expected x [T, K] and weight [N, K], got {tuple(x.shape)}, {tuple(weight.shape)}"
            )
        probe = probe or _Probe(None, None, fmt)
        need_dgrad, need_wgrad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.fmt, ctx.recipe, ctx.generator, ctx.probe = fmt, recipe, generator, probe
        ctx.x_dtype, ctx.w_dtype, ctx.tokens = x.dtype, weight.dtype, x.shape[0]
        if fmt == "nvfp4":
            rht = not recipe.disable_rht
            wq = nvfp4.quantize(weight, two_d=not recipe.disable_2d_quantization)
            xq = nvfp4.quantize(x)
            probe.observe("fprop", "x", x, xq)
            probe.observe("fprop", "w", weight, wq)
            ctx.xt_q = None
            if need_wgrad:
                # RHT needs whole 16-groups along T; the padded zero tokens stay in both operands.
                xt = _pad_rows(x, 16).t()
                ctx.xt_q = nvfp4.quantize(xt, rht=rht)
                probe.observe("wgrad", "x", xt, ctx.xt_q)
            if need_dgrad and recipe.disable_2d_quantization:
                ctx.w_dgrad_q = nvfp4.quantize(weight.t())  # Wᵀ [K, N], 1D along N
                probe.observe("dgrad", "w", weight.t(), ctx.w_dgrad_q)
            else:
                ctx.w_dgrad_q = wq if need_dgrad else None  # 2D tiles: Wᵀ has the same values
        elif fmt == "mxfp8":
            xq = mxfp8.quantize(x, scaling_mode=MXFP8_SCALING_MODE)
            wq = mxfp8.quantize(weight, scaling_mode=MXFP8_SCALING_MODE)
            probe.observe("fprop", "x", x, xq)
            probe.observe("fprop", "w", weight, wq)
            ctx.xt_q = ctx.w_dgrad_q = None
            if need_wgrad:
                ctx.xt_q = mxfp8.quantize(x.t(), scaling_mode=MXFP8_SCALING_MODE)
                probe.observe("wgrad", "x", x.t(), ctx.xt_q)
            if need_dgrad:
                ctx.w_dgrad_q = mxfp8.quantize(weight.t(), scaling_mode=MXFP8_SCALING_MODE)
                probe.observe("dgrad", "w", weight.t(), ctx.w_dgrad_q)
        else:
            raise ValueError(f"QuantizedMatmul handles 'nvfp4' and 'mxfp8', got {fmt!r}")
        return gemm(xq, wq, tb=True).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        dx = dw = None
        probe = ctx.probe
        if ctx.fmt == "nvfp4":
            sr = not ctx.recipe.disable_stochastic_rounding
            if ctx.w_dgrad_q is not None:
                dyq = nvfp4.quantize(dy, stochastic=sr, generator=ctx.generator)
                probe.gradient("dgrad dy", dy, dyq)
                probe.observe("dgrad", "dy", dy, dyq)
                # 2D tiles: the saved W [N, K] itself; 1D: the columnwise copy Wᵀ [K, N].
                dx = gemm(dyq, ctx.w_dgrad_q, tb=ctx.recipe.disable_2d_quantization)
                dx = dx.to(ctx.x_dtype)
            if ctx.xt_q is not None:
                dyt = _pad_rows(dy, 16).t()  # [N, Tp]
                dytq = nvfp4.quantize(
                    dyt, rht=not ctx.recipe.disable_rht, stochastic=sr, generator=ctx.generator
                )
                probe.gradient("wgrad dy", dy, dytq)
                probe.observe("wgrad", "dy", dyt, dytq)
                dw = gemm(dytq, ctx.xt_q, tb=True).to(ctx.w_dtype)
        else:
            if ctx.w_dgrad_q is not None:
                dyq = mxfp8.quantize(dy, scaling_mode=MXFP8_SCALING_MODE)
                probe.gradient("dgrad dy", dy, dyq)
                probe.observe("dgrad", "dy", dy, dyq)
                dx = gemm(dyq, ctx.w_dgrad_q, tb=True).to(ctx.x_dtype)
            if ctx.xt_q is not None:
                dytq = mxfp8.quantize(dy.t(), scaling_mode=MXFP8_SCALING_MODE)
                probe.gradient("wgrad dy", dy, dytq)
                probe.observe("wgrad", "dy", dy.t(), dytq)
                dw = gemm(dytq, ctx.xt_q, tb=True).to(ctx.w_dtype)
        ctx.xt_q = ctx.w_dgrad_q = None
        return dx, dw, None, None, None, None


def quantized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    fmt: str = "nvfp4",
    recipe: NVFP4Recipe | None = None,
    generator: torch.Generator | None = None,
    *,
    bias: torch.Tensor | None = None,
    name: str | None = None,
    telemetry: Telemetry | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ (+ bias) with the GEMMs emulated in `fmt`.

    x [..., K] (leading dims are tokens), weight [N, K], bias [N] or None -> y [..., N], x's dtype.
    fmt: "nvfp4", "mxfp8", or "bf16"/"fp32"/"none" (no quantization: exactly `F.linear`, in the
    operands' own dtype). recipe: NVFP4 switches (default: all techniques on). generator: the stochastic
    rounding stream (see `rng.StochasticRoundingRNG`); None draws from torch's default generator.
    The bias is added in high precision after the GEMM, as TE does. name/telemetry: the layer's
    module name and the `Telemetry` that measures its operands and names it when a gradient is
    zeroed; without telemetry a zeroed NVFP4 gradient is a hard (asynchronous) error.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if fmt in HIGH_PRECISION:
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    probe = _Probe(name, telemetry, fmt) if (name or telemetry) else None
    y = QuantizedMatmul.apply(x2, weight, fmt, recipe or NVFP4Recipe(), generator, probe)
    y = y.view(*x.shape[:-1], weight.shape[0])
    return y + bias if bias is not None else y
