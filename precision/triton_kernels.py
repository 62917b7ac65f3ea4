"""Triton kernels for NVFP4 quantize/dequantize and MXFP8 quantize: the eager path's bits on CUDA.

`nvfp4.quantize`, `NVFP4Tensor.dequantize` and `mxfp8.quantize` call these for CUDA tensors when
triton imports (`nvfp4.triton_for`; `HYMOE_TRITON=off` forces eager). They give, bit for bit, the
codes, E4M3/E8M0 scales and global amax of the eager PyTorch code in nvfp4.py / mxfp8.py, in the
same operation order (/work/shared/nvfp4.md). What keeps the bits equal:
- every division is `tl.math.div_rn` (IEEE); Triton's `/` on fp32 is the approximate div.full.f32;
- FMA contraction is off (`enable_fp_fusion=False`), like the separate eager kernels; the few a·b+c
  left are exact anyway;
- E4M3 is encoded and decoded with integer operations (torch's RNE rule), not `.to(tl.float8e4nv)`:
  the interpreter's fp8 cast is wrong on some inputs, and the bits should not depend on a backend;
- amaxes propagate NaN as torch's amax does (`tl.max` would drop it on a GPU).
The Hadamard transform stays in torch (`nvfp4.rht_transform`, the same matmul as the eager path:
a fused transform would sum in another order than cuBLAS). Stochastic rounding takes its uniforms as
a tensor drawn by the caller from the same generator and shape as the eager path.

Tested on CPU with Triton's interpreter (`TRITON_INTERPRET=1`, tests/test_precision_triton.py), on
a GPU by benchmarks/triton_check.py (`make gpu-check`). Passes over memory: NVFP4 quantize reads
x twice (amax, then quantize: the global amax must be known before any block scale), dequantize
reads the packed bytes and writes float32. The quantize kernels read x in its own dtype and any 2-D
strides (a transposed operand needs no copy) and mask the padding instead of materialising it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import formats

_FP32_MAX = tl.constexpr(formats.FP32_MAX)
_RCP6 = tl.constexpr(formats.RCP_FP4_MAX)
_RCP448 = tl.constexpr(formats.RCP_E4M3_MAX)
# The round-to-nearest-even boundaries of E2M1 magnitudes (formats.RTN_BOUNDARIES).
_B0, _B1, _B2, _B3, _B4, _B5, _B6 = (tl.constexpr(b) for b in formats.RTN_BOUNDARIES)
_TILE = 4096  # elements per program
# No FMA contraction and no flush-to-zero in libdevice calls (tl.floor): IEEE like the eager ops.
_LAUNCH = {"num_warps": 4, "enable_fp_fusion": False, "enable_reflect_ftz": False}


# -- element helpers ------------------------------------------------------------------------------
@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _recip(b):
    """IEEE 1/b (div_rn needs operands of one shape: it does not broadcast)."""
    return tl.math.div_rn(tl.full(b.shape, 1.0, tl.float32), b)


@triton.jit
def _global_scales(amax_ptr):
    """(S, D) from the global amax, as nvfp4.global_encode_scale / global_decode_scale."""
    amax = tl.load(amax_ptr)
    s = tl.math.div_rn(2688.0, amax)
    s = tl.where(s > _FP32_MAX, _FP32_MAX, s)  # clamp(max=): inf -> cap, NaN stays
    s = tl.where(s == 0.0, 1.0, s)
    return s, _recip(s)


@triton.jit
def _e4m3_code(v):
    """float32 v (|v| <= 448, or NaN) -> int32 E4M3 code, sign in bit 7: torch's RNE cast."""
    bits = v.to(tl.int32, bitcast=True)
    a = bits & 0x7FFFFFFF
    af = a.to(tl.float32, bitcast=True)
    small = af < 0.015625  # below 2^-6: subnormal E4M3, code = rne(|v|·2^9) (exact scaling)
    r = tl.where(small, af * 512.0, 0.0)
    fl = r.to(tl.int32)
    frac = r - fl.to(tl.float32)
    sub = fl + ((frac > 0.5) | ((frac == 0.5) & ((fl & 1) == 1))).to(tl.int32)
    # Normal: round the float32 mantissa to 3 bits (ties to even), rebias the exponent 127 -> 7.
    an = tl.minimum(a, 0x43E00000)  # 448: keeps NaN's bits from overflowing (NaN is set below)
    norm = ((an + 0x7FFFF + ((an >> 20) & 1)) >> 20) - 960
    code = tl.where(small, sub, norm)
    code = tl.where(a > 0x7F800000, 0x7F, code)
    return code | tl.where(bits < 0, 0x80, 0)


@triton.jit
def _e4m3_value(code):
    """int32 E4M3 code (0..255) -> float32 value (exact)."""
    e = (code >> 3) & 0xF
    m = code & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)  # subnormal: m·2^-9
    v = tl.where((code & 0x7F) == 0x7F, float("nan"), v)
    return tl.where((code & 0x80) != 0, -v, v)


@triton.jit
def _e2m1_code(q, u, STOCHASTIC: tl.constexpr):
    """float32 q clamped to [-6, 6] -> int32 E2M1 code (nvfp4._round_e2m1)."""
    mag = tl.abs(q)
    if STOCHASTIC:
        step = tl.where(mag < 2.0, 0.5, tl.where(mag < 4.0, 1.0, 2.0))
        lo = tl.floor(tl.math.div_rn(mag, step)) * step
        mag = lo + step * ((u * step) < (mag - lo)).to(tl.float32)
    idx = (mag > _B0).to(tl.int32) + (mag > _B1).to(tl.int32) + (mag > _B2).to(tl.int32)
    idx += (mag > _B3).to(tl.int32) + (mag > _B4).to(tl.int32) + (mag > _B5).to(tl.int32)
    idx += (mag > _B6).to(tl.int32)
    return idx + tl.where(q < 0.0, 8, 0)


@triton.jit
def _e2m1_value(code):
    """int32 E2M1 code (0..15) -> float32 value; code 8 is -0.0."""
    idx = code & 7
    mag = tl.where(idx >= 2, ((126 + (idx >> 1)) << 23) | ((idx & 1) << 22), 0)
    mag = tl.where(idx == 1, 126 << 23, mag)
    return (mag | ((code & 8) << 28)).to(tl.float32, bitcast=True)


# -- kernels ---------------------------------------------------------------------------------------
# Row counts follow the token count, which changes from call to call: not specialised on (one
# compiled kernel for all). Inner sizes and strides are, so aligned loads and stores vectorise.
@triton.jit(do_not_specialize=["R"])
def _amax_kernel(x_ptr, partial_ptr, R, K, stride_r, stride_c, BLOCK_R: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    x = tl.load(x_ptr + rows * stride_r + cols * stride_c, mask=(rows < R) & (cols < K), other=0.0)
    a = tl.reduce(tl.reshape(tl.abs(x.to(tl.float32)), (BLOCK_R * BLOCK_C,)), 0, _max_nan)
    tl.store(partial_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), a)


@triton.jit(do_not_specialize=["R", "RP"])
def _nvfp4_quantize_kernel(x_ptr, u_ptr, amax_ptr, data_ptr, scale_ptr, R, K, RP, KP, stride_r,
                           stride_c, TWO_D: tl.constexpr, STOCHASTIC: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    NB: tl.constexpr = BLOCK_C // 16
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    x = tl.load(x_ptr + rows * stride_r + cols * stride_c, mask=(rows < R) & (cols < K), other=0.0)
    x = tl.reshape(x.to(tl.float32), (BLOCK_R, NB, 16))
    s_enc, s_dec = _global_scales(amax_ptr)
    block_amax = tl.reduce(tl.abs(x), 2, _max_nan)  # [BLOCK_R, NB]
    if TWO_D:  # one 16x16 tile per column block: BLOCK_R == 16
        block_amax = tl.reduce(block_amax, 0, _max_nan, keep_dims=True)  # [1, NB]
    # TE's order (nvfp4._finish): fold 1/6 into S, times the block amax, clamp, RNE to E4M3.
    s = block_amax * (s_enc * _RCP6)
    s = tl.where(s > 448.0, 448.0, s)
    scale = _e4m3_code(s)
    mult = _recip(_e4m3_value(scale) * s_dec)
    mult = tl.where(mult > _FP32_MAX, _FP32_MAX, mult)
    q = tl.reshape(x * mult[:, :, None], (BLOCK_R, BLOCK_C))
    q = tl.where(q > 6.0, 6.0, tl.where(q < -6.0, -6.0, q))
    inside = (rows < RP) & (cols < KP)
    u = None
    if STOCHASTIC:
        u = tl.load(u_ptr + rows * KP + cols, mask=inside, other=0.0)
    codes = tl.reshape(_e2m1_code(q, u, STOCHASTIC), (BLOCK_R, BLOCK_C // 2, 2))
    lo, hi = tl.split(codes)
    half = (tl.program_id(1) * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2))[None, :]
    tl.store(data_ptr + rows * (KP // 2) + half, (lo | (hi << 4)).to(tl.uint8),
             mask=(rows < RP) & (half < KP // 2))
    sc = (tl.program_id(1) * NB + tl.arange(0, NB))[None, :]
    if TWO_D:
        tl.store(scale_ptr + tl.program_id(0) * (KP // 16) + sc, scale.to(tl.uint8),
                 mask=sc < KP // 16)
    else:
        tl.store(scale_ptr + rows * (KP // 16) + sc, scale.to(tl.uint8),
                 mask=(rows < RP) & (sc < KP // 16))


@triton.jit(do_not_specialize=["R"])
def _nvfp4_dequantize_kernel(data_ptr, scale_ptr, amax_ptr, out_ptr, R, K, KP,
                             TWO_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    NB: tl.constexpr = BLOCK_C // 16
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    half = (tl.program_id(1) * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2))[None, :]
    b = tl.load(data_ptr + rows * (KP // 2) + half, mask=(rows < R) & (half < KP // 2), other=0)
    b = b.to(tl.int32)
    v = tl.reshape(tl.join(_e2m1_value(b & 0xF), _e2m1_value(b >> 4)), (BLOCK_R, NB, 16))
    sc = (tl.program_id(1) * NB + tl.arange(0, NB))[None, :]
    srow = rows
    if TWO_D:  # a tile's scale serves its 16 rows
        srow = rows // 16
    s8 = tl.load(scale_ptr + srow * (KP // 16) + sc, mask=(rows < R) & (sc < KP // 16), other=0)
    _, s_dec = _global_scales(amax_ptr)
    # (value·s8)·D, as nvfp4._dequantize_blocks: value·s8 is exact, one rounding in all.
    v = tl.reshape(v * _e4m3_value(s8.to(tl.int32))[:, :, None], (BLOCK_R, BLOCK_C)) * s_dec
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    tl.store(out_ptr + rows * K + cols, v, mask=(rows < R) & (cols < K))


@triton.jit(do_not_specialize=["R"])
def _mxfp8_quantize_kernel(x_ptr, data_ptr, scale_ptr, R, K, KP, stride_r, stride_c,
                           RCEIL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    NB: tl.constexpr = BLOCK_C // 32
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    x = tl.load(x_ptr + rows * stride_r + cols * stride_c, mask=(rows < R) & (cols < K), other=0.0)
    x = tl.reshape(x.to(tl.float32), (BLOCK_R, NB, 32))
    amax = tl.reduce(tl.abs(x), 2, _max_nan)  # [BLOCK_R, NB]
    if RCEIL:  # mxfp8._scale_rceil
        v = amax * _RCP448
        vb = v.to(tl.int32, bitcast=True)
        exp = (vb >> 23) & 0xFF
        mant = vb & 0x7FFFFF
        up = (mant > 0) & (exp != 0xFE) & ~((exp == 0) & (mant <= 0x400000))
        biased = exp + up.to(tl.int32)
        biased = tl.where((vb & 0x7FFFFFFF) == 0x7F800000, 0xFE, biased)  # inf
        biased = tl.where((vb & 0x7FFFFFFF) > 0x7F800000, 255, biased)  # NaN
        divisor = tl.where(biased == 0, 0x400000, biased << 23).to(tl.float32, bitcast=True)
    else:  # mxfp8._scale_floor
        ab = amax.to(tl.int32, bitcast=True)
        e = ((ab >> 23) & 0xFF) - 135
        e = tl.where(e < -127, -127, tl.where(e > 128, 128, e))
        biased = tl.where((ab & 0x7FFFFFFF) > 0x7F800000, 255, e + 127)  # NaN: 255
        divisor = (biased << 23).to(tl.float32, bitcast=True)
        divisor = tl.where(divisor < 1.1754943508222875e-38, 1.1754943508222875e-38, divisor)
    y = tl.math.div_rn(x, tl.broadcast_to(divisor[:, :, None], (BLOCK_R, NB, 32)))
    y = tl.reshape(y, (BLOCK_R, BLOCK_C))
    y = tl.where(y > 448.0, 448.0, tl.where(y < -448.0, -448.0, y))
    tl.store(data_ptr + rows * KP + cols, _e4m3_code(y).to(tl.uint8),
             mask=(rows < R) & (cols < KP))
    sc = (tl.program_id(1) * NB + tl.arange(0, NB))[None, :]
    tl.store(scale_ptr + rows * (KP // 32) + sc, biased.to(tl.uint8),
             mask=(rows < R) & (sc < KP // 32))


# -- host wrappers ---------------------------------------------------------------------------------
def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as a 2-D [R, K] tensor with its own strides (a copy only if no view exists)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _tile(rows: int, kp: int, block: int, two_d: bool = False) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): powers of two, BLOCK_C a multiple of `block`, ~_TILE elements."""
    block_c = max(block, min(128, triton.next_power_of_2(kp)))
    block_r = 16 if two_d else max(1, min(_TILE // block_c, triton.next_power_of_2(max(rows, 1))))
    return block_r, block_c


def amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over x [..., K] (float32/bf16/fp16): float32 0-dim; NaN if any element is NaN."""
    x2 = _as_rows(x)
    r, k = x2.shape
    br, bc = _tile(r, k, 16)
    br = max(br, min(64, triton.next_power_of_2(max(r, 1))))  # amax: bigger tiles, fewer partials
    grid = (triton.cdiv(r, br), triton.cdiv(k, bc))
    partial = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=x.device)
    _amax_kernel[grid](x2, partial, r, k, x2.stride(0), x2.stride(1), BLOCK_R=br, BLOCK_C=bc,
                       **_LAUNCH)
    return partial.amax()


def nvfp4_quantize(x: torch.Tensor, u: torch.Tensor | None, *, two_d: bool):
    """x [..., K] (transformed already if RHT applies), u: uniforms of the padded shape or None ->
    (packed codes uint8 [..., Kp/2] (2D: [Mp, Kp/2]), float8_e4m3fn scales [..., Kp/16] (2D:
    [Mp/16, Kp/16]), float32 0-dim global amax): nvfp4.quantize's layout and bits."""
    x2 = _as_rows(x)
    r, k = x2.shape
    kp = -(-k // formats.NVFP4_BLOCK) * formats.NVFP4_BLOCK
    rp = -(-r // formats.NVFP4_BLOCK) * formats.NVFP4_BLOCK if two_d else r
    lead = (rp,) if two_d else tuple(x.shape[:-1])
    global_amax = amax(x2)
    data = torch.empty(*lead, kp // 2, dtype=torch.uint8, device=x.device)
    srows = (rp // formats.NVFP4_BLOCK,) if two_d else lead
    scale = torch.empty(*srows, kp // formats.NVFP4_BLOCK, dtype=torch.uint8, device=x.device)
    br, bc = _tile(rp, kp, 16, two_d)
    grid = (triton.cdiv(rp, br), triton.cdiv(kp, bc))
    u_arg = u.contiguous() if u is not None else data  # any pointer: unread without STOCHASTIC
    _nvfp4_quantize_kernel[grid](x2, u_arg, global_amax, data, scale, r, k, rp, kp, x2.stride(0),
                                 x2.stride(1), TWO_D=two_d, STOCHASTIC=u is not None,
                                 BLOCK_R=br, BLOCK_C=bc, **_LAUNCH)
    return data, scale.view(torch.float8_e4m3fn), global_amax


def nvfp4_dequantize(data: torch.Tensor, scale: torch.Tensor, global_amax: torch.Tensor,
                     shape: torch.Size, two_d: bool) -> torch.Tensor:
    """float32 values of an NVFP4 tensor, cut to its original `shape` (NVFP4Tensor.dequantize)."""
    kp = 2 * data.shape[-1]
    k = shape[-1]
    r = shape[0] if two_d else data.numel() // data.shape[-1]
    out = torch.empty(shape, dtype=torch.float32, device=data.device)
    br, bc = _tile(r, kp, 16)
    grid = (triton.cdiv(r, br), triton.cdiv(kp, bc))
    _nvfp4_dequantize_kernel[grid](data.contiguous(), scale.contiguous().view(torch.uint8),
                                   global_amax, out, r, k, kp, TWO_D=two_d, BLOCK_R=br,
                                   BLOCK_C=bc, **_LAUNCH)
    return out


def mxfp8_quantize(x: torch.Tensor, scaling_mode: str):
    """x [..., K] -> (float8_e4m3fn data [..., Kp], uint8 E8M0 scales [..., Kp/32]): the layout
    and bits of mxfp8.quantize."""
    x2 = _as_rows(x)
    r, k = x2.shape
    kp = -(-k // formats.MXFP8_BLOCK) * formats.MXFP8_BLOCK
    lead = tuple(x.shape[:-1])
    data = torch.empty(*lead, kp, dtype=torch.uint8, device=x.device)
    scale = torch.empty(*lead, kp // formats.MXFP8_BLOCK, dtype=torch.uint8, device=x.device)
    br, bc = _tile(r, kp, formats.MXFP8_BLOCK)
    grid = (triton.cdiv(r, br), triton.cdiv(kp, bc))
    _mxfp8_quantize_kernel[grid](x2, data, scale, r, k, kp, x2.stride(0), x2.stride(1),
                                 RCEIL=scaling_mode == "rceil", BLOCK_R=br, BLOCK_C=bc, **_LAUNCH)
    return data.view(torch.float8_e4m3fn), scale
