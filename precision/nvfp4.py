"""Emulated NVFP4: E2M1 elements, E4M3 block scales, one FP32 global scale per tensor.

Bit-for-bit the codes and scales of Transformer Engine's NVFP4 recipe (TE 2.20), following
`/work/shared/nvfp4.md` and TE's operation order, including the ties that order decides (checked
against TE's reference quantizer in tests/test_nvfp4_te_reference.py). Pure PyTorch, vectorised,
CPU or GPU; all arithmetic in FP32 like TE's reference. Stochastic rounding draws from a
`torch.Generator`, so it is distributed like TE's but not bit-identical to its in-kernel RNG.
On CUDA, quantize and dequantize run Triton kernels with the same bits (triton_kernels.py; see
`triton_for` at the end of this file); on CPU large tensors may run torch.compile'd (`_kernel`).

Layout (x has shape [..., K]; Kp = K rounded up to a multiple of 16, Mp likewise for 2D):
- `data`: uint8 [..., Kp/2], two E2M1 codes per byte: element 2i low nibble, 2i+1 high nibble.
- `scale`: float8_e4m3fn, [..., Kp/16] for 1D blocks or [Mp/16, Kp/16] for 2D 16×16 tiles.
- `global_amax`: float32 0-dim tensor; the global decode scale is D = 1/S with S = 2688/amax.
Padding is zeros (it changes no amax) and `dequantize` cuts it off.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings

import torch
import torch.nn.functional as F

from .formats import E2M1_VALUES, E4M3_MAX, FP4_MAX, FP32_MAX, RCP_FP4_MAX
from .formats import NVFP4_BLOCK as BLOCK
from .formats import RTN_BOUNDARIES as _RTN_BOUNDARIES

# TE's fixed RHT signs (`get_wgrad_sign_vector()` in TE 2.20's reference_nvfp4.py and
# pytorch/tensor/nvfp4_tensor.py); one vector shared by all layers.
RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def _magnitude_index(mag: torch.Tensor) -> torch.Tensor:
    """float32 magnitudes in [0, 6] -> E2M1 magnitude index 0..7, round to nearest even.

    uint8 in eager mode: seven compare-and-add passes over uint8 are ~4x faster on CPU than
    torch.bucketize. Under torch.compile float32 (exact small integers): inductor vectorises uint8
    masks poorly (~7x slower than float), and the caller converts once at the end.
    """
    if torch.compiler.is_compiling():
        idx = (mag > _RTN_BOUNDARIES[0]).to(torch.float32)
        for b in _RTN_BOUNDARIES[1:]:
            idx = idx + (mag > b).to(torch.float32)
        return idx
    idx = (mag > _RTN_BOUNDARIES[0]).view(torch.uint8)
    for b in _RTN_BOUNDARIES[1:]:
        idx += (mag > b).view(torch.uint8)
    return idx


@functools.cache
def _value_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)


@functools.cache
def _byte_table(device: torch.device) -> torch.Tensor:
    """[256, 2] float32: the two E2M1 values of a packed byte (low nibble, high nibble)."""
    vals = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    return torch.stack((vals.repeat(16), vals.repeat_interleave(16)), dim=-1).to(device)


def _round_e2m1(q: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """Codes of q (float32, clamped to [-6, 6]): RTN, or stochastic with uniforms u (q's shape).

    uint8 codes in eager mode, float32-valued codes under torch.compile (see `_magnitude_index`).
    """
    mag = q.abs()
    if u is not None:
        # Grid spacing around |q|: 0.5 below 2, 1 in [2, 4), 2 in [4, 6]. Powers of two, so the
        # division, floor, products and difference below are all exact in float32.
        step = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0))
        lo = torch.floor(mag / step) * step
        # u·step < |q| - lo  <=>  u < p; exactly on the grid (|q| = lo) it never rounds up.
        mag = lo + step * (u * step < mag - lo)
    idx = _magnitude_index(mag)
    if torch.compiler.is_compiling():
        return idx + (q < 0).to(torch.float32) * 8
    return idx.add_((q < 0).view(torch.uint8), alpha=8)


def cast_to_e2m1(
    q: torch.Tensor, *, stochastic: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Round float32 values already clamped to [-6, 6] to E2M1 codes (uint8, same shape, unpacked).

    Round-to-nearest-even by default. With `stochastic`, |q| goes to one of its two neighbouring
    magnitudes lo <= |q| < hi, to hi with probability (|q| - lo) / (hi - lo), so E[value] = q;
    uniforms come from `generator` (on q's device; None uses torch's default generator), one per
    element, drawn in q's row-major order. The sign is q's: -0.0 gives code 0, a small negative that
    rounds to zero gives code 8 (negative zero), as in TE.
    """
    u = _uniforms(q.shape, generator, q.device) if stochastic else None
    return _round_e2m1(q, u)


def _uniforms(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., 2n] -> uint8 bytes [..., n]; element 2i low nibble, 2i+1 high nibble."""
    if torch.compiler.is_compiling():  # float32-valued codes (see `_round_e2m1`): one cast
        pairs = codes.unflatten(-1, (-1, 2))
        return (pairs[..., 0] + pairs[..., 1] * 16).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 bytes [..., n] -> uint8 codes [..., 2n] (inverse of `pack_e2m1`)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes -> float32 values (same shape)."""
    return _value_table(codes.device)[codes.long()]


def packed_to_float(packed: torch.Tensor) -> torch.Tensor:
    """uint8 bytes [..., n] -> float32 values [..., 2n]: one table look-up per byte."""
    table = _byte_table(packed.device)
    return table.index_select(0, packed.reshape(-1).int()).view(*packed.shape[:-1], 2 * packed.shape[-1])


@functools.cache
def _rht_matrix_f32(device: torch.device) -> torch.Tensor:
    # Sylvester construction, signs on the rows (diag(signs) @ H), scaled by 1/sqrt(16) = 1/4.
    h = torch.ones(1, 1, dtype=torch.float32)
    while h.shape[0] < BLOCK:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.tensor(RHT_SIGNS, dtype=torch.float32)
    return (signs[:, None] * h).to(device)


def rht_matrix(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The 16×16 RHT matrix T = diag(signs)·H16·(1/4), orthogonal (T·Tᵀ = I); dtype [16, 16]."""
    # The 1/4 is applied in `dtype`, as TE's reference does (exact: a power of two).
    return _rht_matrix_f32(torch.device(device or "cpu")).to(dtype) * 0.25


def rht_transform(x: torch.Tensor) -> torch.Tensor:
    """Random Hadamard transform of consecutive 16-groups along the last dim: [..., K] -> [..., K].

    Each group g becomes g·T (T from `rht_matrix`). Computed in x's dtype like TE's reference, so a
    bf16 input gives a bf16 output (rounded once per element). K must be a multiple of 16.
    """
    if x.shape[-1] % BLOCK:
        raise ValueError(f"RHT needs the last dim to be a multiple of {BLOCK}, got {x.shape[-1]}")
    t = rht_matrix(x.dtype, x.device)
    return (x.contiguous().view(-1, BLOCK) @ t).view(x.shape)


def global_encode_scale(amax: torch.Tensor) -> torch.Tensor:
    """S = (448·6)/amax, float32 0-dim: capped at the FP32 max (amax = 0), 1 if 0 (amax = inf)."""
    s = torch.div(E4M3_MAX * FP4_MAX, amax.to(torch.float32)).clamp(max=FP32_MAX)
    return torch.where(s == 0, torch.ones_like(s), s)


def global_decode_scale(amax: torch.Tensor) -> torch.Tensor:
    """D = 1/S, float32 0-dim."""
    return torch.div(1.0, global_encode_scale(amax))


def block_multiplier(scale: torch.Tensor, decode: torch.Tensor) -> torch.Tensor:
    """m = 1/(float(s8)·D) per block, float32, capped at the FP32 max (s8 = 0 gives the cap)."""
    return torch.div(1.0, scale.to(torch.float32) * decode).clamp(max=FP32_MAX)


@dataclasses.dataclass
class NVFP4Tensor:
    """An NVFP4-quantized tensor (see the module docstring for layouts).

    `rht=True` means the codes encode rht_transform(x), and `dequantize` returns values in that
    transformed domain: pair it with another operand transformed along the same dim (the product
    is unchanged, T being orthogonal), or multiply each 16-group by Tᵀ = rht_matrix().t().
    A NaN input makes `global_amax` NaN and every dequantized value NaN (the codes cannot carry it).
    """

    data: torch.Tensor  # uint8 [..., Kp/2]
    scale: torch.Tensor  # float8_e4m3fn [..., Kp/16] (1D) or [Mp/16, Kp/16] (2D)
    global_amax: torch.Tensor  # float32 0-dim
    shape: torch.Size  # the original (unpadded) shape
    two_d: bool = False
    rht: bool = False

    @property
    def decode_scale(self) -> torch.Tensor:
        """D = 1/S, float32 0-dim."""
        return global_decode_scale(self.global_amax)

    def codes(self) -> torch.Tensor:
        """Unpacked E2M1 codes, uint8 [..., Kp] (padded like `data`)."""
        return unpack_e2m1(self.data)

    def block_scales(self) -> torch.Tensor:
        """The E4M3 scale of every 16-element block along the last dim, [..., Kp/16] (a 2D tile's
        scale repeated on its 16 rows)."""
        return self.scale.repeat_interleave(BLOCK, dim=0) if self.two_d else self.scale

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x̂ = value(code)·float(scale)·D in float32, cast to `dtype`; the original shape."""
        kernels = triton_for(self.data)
        if kernels is not None:
            return kernels.nvfp4_dequantize(
                self.data, self.scale, self.global_amax, self.shape, self.two_d
            ).to(dtype)
        # One row per 16-element block (a 2D tile's scale repeated on its 16 rows): the kernel
        # sees [blocks, 8] bytes whatever the tensor's shape (see `quantize`).
        data = self.data.reshape(-1, BLOCK // 2)
        scale = self.block_scales().reshape(-1, 1)
        vals = _kernel("dequantize", data)(data, scale, self.global_amax)
        vals = vals.view(*self.data.shape[:-1], 2 * self.data.shape[-1])
        vals = vals[tuple(slice(0, n) for n in self.shape)]
        return vals.to(dtype)

    def any_nonzero(self) -> torch.Tensor:
        """Whether any dequantized value is non-zero, bool 0-dim on the device (no sync): a non-zero
        code in a block whose scale is non-zero (a scale that underflowed to 0 zeroes its block)."""
        codes = ((self.data.reshape(-1, BLOCK // 2) & 0x77) != 0).any(dim=1)  # magnitude bits
        scales = (self.block_scales().reshape(-1).view(torch.uint8) & 0x7F) != 0
        return (codes & scales).any()

    def block_values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """value(code)·float(scale): `dequantize()` without the global decode scale (x̂ = this·D).

        Exact in bfloat16 and float16, not only float32: E2M1 × E4M3 has at most 6 significant bits
        and magnitudes in [2⁻¹⁰, 2688]. A GEMM can therefore take these in 16 bits and apply D to
        its FP32 output, as NVFP4 GEMMs apply the global scales in their epilogue.
        """
        # global_amax = 448·6 gives S = D = 1 exactly, so dequantize's last multiply is exact.
        unit = torch.full_like(self.global_amax, E4M3_MAX * FP4_MAX)  # on the device, no copy
        return dataclasses.replace(self, global_amax=unit).dequantize(dtype)


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = -x.shape[dim] % multiple
    if not extra:
        return x
    pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [0, extra]
    return F.pad(x, pad)


def quantize(
    x: torch.Tensor,
    *,
    two_d: bool = False,
    rht: bool = False,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> NVFP4Tensor:
    """Quantize x [..., K] (float32/bfloat16/float16) to NVFP4 along the last dim.

    two_d: one scale per 16×16 tile (x must be 2-D [M, K]); else one per 16 elements along K.
    rht: apply `rht_transform` first (K must be a multiple of 16); amax is taken after it.
    stochastic: stochastic rounding of the elements, uniforms from `generator` (scales stay RTN).
    """
    if not x.is_floating_point():
        raise TypeError(f"NVFP4 quantize needs a floating-point tensor, got {x.dtype}")
    if two_d and x.dim() != 2:
        raise ValueError(f"2D (16x16) quantization needs a 2-D tensor, got shape {tuple(x.shape)}")
    shape = x.shape
    if rht:  # eager, in x's dtype, as TE's reference does (a compiled GEMM may sum differently)
        x = rht_transform(x)
    # Uniforms are drawn here, outside any compiled or Triton code, one per padded element in
    # row-major order, so every path consumes the generator identically.
    padded = (*x.shape[:-1], x.shape[-1] + -x.shape[-1] % BLOCK)
    if two_d:
        padded = (padded[0] + -padded[0] % BLOCK, padded[1])
    u = _uniforms(padded, generator, x.device) if stochastic else None
    kernels = triton_for(x)
    if kernels is not None:
        data, scale, global_amax = kernels.nvfp4_quantize(x, u, two_d=two_d)
        return NVFP4Tensor(data, scale, global_amax, shape, two_d=two_d, rht=rht)
    xf = _pad_to(x.to(torch.float32).contiguous(), -1, BLOCK)
    if two_d:
        xf = _pad_to(xf, 0, BLOCK)
    if two_d:
        data, scale, global_amax = _kernel("quantize_2d", xf)(xf, u)
    else:
        # One row per 16-element block: the same kernel (and one compiled graph) for every shape.
        xb, ub = xf.view(-1, BLOCK), (u.view(-1, BLOCK) if u is not None else None)
        data, scale, global_amax = _kernel("quantize_1d", xb, stochastic)(xb, ub)
        kp = xf.shape[-1]
        data = data.view(*xf.shape[:-1], kp // 2)
        scale = scale.view(*xf.shape[:-1], kp // BLOCK)
    return NVFP4Tensor(data, scale, global_amax, shape, two_d=two_d, rht=rht)


def _finish(block_amax: torch.Tensor, empty: torch.Tensor):
    """(global amax, E4M3 scales, multipliers m = 1/(s8·D)) from the block amaxes."""
    # max over block amaxes == max |x| (padding is zeros); an empty tensor has amax 0.
    global_amax = block_amax.amax() if block_amax.numel() else empty.new_zeros(())
    s_enc = global_encode_scale(global_amax)
    s_dec = torch.div(1.0, s_enc)
    # TE's order: fold 1/6 into the global scale first, then multiply by the block amax.
    s = (block_amax * (s_enc * RCP_FP4_MAX)).clamp(max=FP32_MAX)
    scale = s.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)  # RNE cast
    # Multiplier m = 1/(s8·D), capped so that an all-zero block (s8 = 0) gives 0·FP32_MAX = 0.
    return global_amax, scale, block_multiplier(scale, s_dec)


def _quantize_blocks(xb: torch.Tensor, u: torch.Tensor | None):
    """The 1D quantizer proper. xb: zero-padded float32 blocks [n, 16]; u: uniforms [n, 16] for
    stochastic rounding or None -> (packed codes uint8 [n, 8], E4M3 scales [n, 1], global amax).
    Runs eagerly and under torch.compile with identical bits (tests/test_precision_compiled.py)."""
    global_amax, scale, mult = _finish(xb.abs().amax(dim=-1, keepdim=True), xb)
    q = (xb * mult).clamp(-FP4_MAX, FP4_MAX)
    return pack_e2m1(_round_e2m1(q, u)), scale, global_amax


def _quantize_tiles(xf: torch.Tensor, u: torch.Tensor | None):
    """The 2D quantizer: xf zero-padded float32 [Mp, Kp], one scale per 16×16 tile -> (packed
    codes [Mp, Kp/2], E4M3 scales [Mp/16, Kp/16], global amax)."""
    mp, kp = xf.shape
    tiles = xf.view(mp // BLOCK, BLOCK, kp // BLOCK, BLOCK)
    global_amax, scale, mult = _finish(tiles.abs().amax(dim=(1, 3)), xf)
    q = (tiles * mult[:, None, :, None]).view(mp, kp).clamp(-FP4_MAX, FP4_MAX)
    return pack_e2m1(_round_e2m1(q, u)), scale, global_amax


def _dequantize_blocks(data: torch.Tensor, scale: torch.Tensor, global_amax: torch.Tensor):
    """value(code)·float(s8)·D for packed blocks data [n, 8] with E4M3 scales [n, 1] -> float32
    [n, 16]. (value·s8)·D in this order: value·s8 is exact, so one rounding in all. One table
    look-up per byte (two values) is ~3x faster than one per code, eagerly and compiled; code 8's
    -0.0 survives inductor's -fno-signed-zeros because it comes from the table at run time."""
    return packed_to_float(data) * scale.to(torch.float32) * global_decode_scale(global_amax)


# -- compiled CPU kernels ------------------------------------------------------------------------
# torch.compile (inductor's C++ backend, gcc) fuses the ~25 eager passes of `_quantize_blocks` into
# two loops: quantize and dequantize each ~4-5x faster on CPU (benchmarks/quantize.py). The
# bits are the same (inductor keeps IEEE division, no FMA contraction, no reassociation; checked by
# tests/test_precision_compiled.py). It costs a compile of a few seconds per kernel variant and
# process, so "auto" uses it only for tensors of at least COMPILE_MIN_NUMEL elements on CPU. CUDA
# tensors take hymoe's own Triton kernels instead (`triton_for`, end of file), whose bits are
# checked; inductor's Triton code is not.
COMPILE_MODES = ("auto", "on", "off")
COMPILE_MIN_NUMEL = 1 << 18
_compile_mode = os.environ.get("HYMOE_NVFP4_COMPILE", "auto")
_compiled: dict[tuple, object] = {}
_EAGER = {
    "quantize_1d": _quantize_blocks,
    "quantize_2d": _quantize_tiles,
    "dequantize": _dequantize_blocks,
}


def set_compile(mode: str) -> None:
    """Compiled CPU kernels: "auto" (large CPU tensors), "on" (every CPU tensor) or "off"."""
    global _compile_mode
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    _compile_mode = mode


def _kernel(name: str, t: torch.Tensor, *variant):
    """The eager kernel `name`, or its compiled version for this variant of static arguments
    (stochastic or not: one compiled graph each). t: the kernel's first argument; its dim 0 is
    compiled as dynamic, its other dims (16 or 8 per block; Kp for 2D tiles) as static — a
    dynamic inner dim costs ~2-4x in inductor's C++ loops."""
    elements = t.numel() * (2 if t.dtype == torch.uint8 else 1)  # packed: two per byte
    if (
        _compile_mode == "off"
        or t.device.type != "cpu"
        or (_compile_mode == "auto" and elements < COMPILE_MIN_NUMEL)
        # Size 0/1 dims would be specialised (a recompile each); one 2D tile also hits an
        # inductor codegen bug. Tensors that small are fast eagerly anyway.
        or t.shape[0] < 2 * BLOCK
        or (name == "quantize_2d" and t.shape[1] < 2 * BLOCK)
        or torch.compiler.is_compiling()
    ):
        return _EAGER[name]
    key = (name, *variant)
    fn = _compiled.get(key)
    if fn is None:
        fn = _compiled[key] = _try_compiled(name, key)
    return fn


def _try_compiled(name: str, key: tuple):
    """torch.compile of the eager kernel (dim 0 dynamic), falling back to it with one warning if
    compiling fails, e.g. without a C++ compiler."""
    compiled = torch.compile(_EAGER[name])

    def run(*args):
        try:
            for a in args:
                if isinstance(a, torch.Tensor) and a.dim():
                    torch._dynamo.maybe_mark_dynamic(a, 0)
            return compiled(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: stay eager
            warnings.warn(f"hymoe nvfp4: torch.compile of {name} failed ({e}); using eager")
            _compiled[key] = _EAGER[name]
            return _EAGER[name](*args)

    return run


# -- Triton kernels on CUDA ----------------------------------------------------------------------
# CUDA tensors go through hymoe's Triton kernels (triton_kernels.py: one amax pass, one fused
# quantize pass, one dequantize pass instead of ~25 eager kernels), bit-identical to the code above
# (tests/test_precision_triton.py in Triton's interpreter; benchmarks/gpu_check.py on a GPU).
# The one switch: HYMOE_TRITON=off, or set_triton("off"), forces the eager path (for debugging).
# mxfp8.quantize asks the same `triton_for`.
TRITON_MODES = ("auto", "off")


def set_triton(mode: str) -> None:
    """Triton kernels for CUDA tensors: "auto" (when triton imports) or "off" (always eager)."""
    global _triton_mode
    if mode not in TRITON_MODES:
        raise ValueError(f"HYMOE_TRITON / triton mode must be one of {TRITON_MODES}, got {mode!r}")
    _triton_mode = mode


set_triton(os.environ.get("HYMOE_TRITON", "auto"))


def triton_for(t: torch.Tensor):
    """The Triton kernel module for tensor t, or None for the eager path: t on CUDA, non-empty,
    mode "auto", triton importable, and not inside torch.compile (inductor fuses the eager code)."""
    if (
        _triton_mode == "off"
        or t.device.type != "cuda"
        or not t.numel()
        or torch.compiler.is_compiling()
    ):
        return None
    return _import_triton_kernels()


@functools.cache
def _import_triton_kernels():
    # An optional dependency: triton without a working CUDA toolchain can raise RuntimeError.
    try:
        from . import triton_kernels
    except (ImportError, RuntimeError) as e:
        warnings.warn(f"hymoe: triton kernels unavailable ({e}); NVFP4/MXFP8 run eagerly on CUDA")
        return None
    return triton_kernels
