"""Emulated NVFP4: E2M1 elements, E4M3 block scales, one FP32 global scale per tensor.

Bit-for-bit the codes and scales of Transformer Engine's NVFP4 recipe (TE 2.20), following
`/work/shared/nvfp4.md` and TE's operation order, including the ties that order decides (checked
against TE's reference quantizer in tests/test_nvfp4_te_reference.py). Pure PyTorch, vectorised,
CPU or GPU; all arithmetic in FP32 like TE's reference. Stochastic rounding draws from a
`torch.Generator`, so it is distributed like TE's but not bit-identical to its in-kernel RNG.

Layout (x has shape [..., K]; Kp = K rounded up to a multiple of 16, Mp likewise for 2D):
- `data`: uint8 [..., Kp/2], two E2M1 codes per byte: element 2i low nibble, 2i+1 high nibble.
- `scale`: float8_e4m3fn, [..., Kp/16] for 1D blocks or [Mp/16, Kp/16] for 2D 16×16 tiles.
- `global_amax`: float32 0-dim tensor; the global decode scale is D = 1/S with S = 2688/amax.
Padding is zeros (it changes no amax) and `dequantize` cuts it off.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

BLOCK = 16
FP4_MAX = 6.0
E4M3_MAX = 448.0
FP32_MAX = torch.finfo(torch.float32).max
# fl32(1/6) as a Python float that is exactly representable in float32, so float32 arithmetic with
# it matches TE's `torch.reciprocal(6.0)` in float32.
RCP_FP4_MAX = torch.reciprocal(torch.tensor(FP4_MAX, dtype=torch.float32)).item()

# Code c = sign*8 + index; code 8 is negative zero (kept: TE gives it to small negatives).
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = E2M1_MAGNITUDES + tuple(-v for v in E2M1_MAGNITUDES)

# TE's fixed RHT signs (`get_wgrad_sign_vector()` in TE 2.20's reference_nvfp4.py and
# pytorch/tensor/nvfp4_tensor.py); one vector shared by all layers.
RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def _down(v: float) -> float:
    """The float32 just below v, as a Python float."""
    return torch.nextafter(torch.tensor(v), torch.tensor(0.0)).item()


# A magnitude above boundary i rounds to an index > i. Ties that go down to an even index (0.25->0,
# 1.25->1, 2.5->2, 5->4) sit exactly on their boundary (strict '>'); for the ties that go up
# (0.75->1, 1.75->2, 3.5->4) the boundary is moved one float32 ulp down so that the tie counts.
_RTN_BOUNDARIES = (0.25, _down(0.75), 1.25, _down(1.75), 2.5, _down(3.5), 5.0)


def _magnitude_index(mag: torch.Tensor) -> torch.Tensor:
    """float32 magnitudes in [0, 6] -> E2M1 magnitude index 0..7 (uint8), round to nearest even."""
    # Seven compare-and-add passes over uint8 are ~4x faster on CPU than torch.bucketize.
    idx = (mag > _RTN_BOUNDARIES[0]).view(torch.uint8)
    for b in _RTN_BOUNDARIES[1:]:
        idx += (mag > b).view(torch.uint8)
    return idx


@functools.cache
def _value_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)


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
    mag = q.abs()
    if stochastic:
        # Grid spacing around |q|: 0.5 below 2, 1 in [2, 4), 2 in [4, 6]. Powers of two, so the
        # division, floor, products and difference below are all exact in float32.
        step = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0))
        lo = torch.floor(mag / step).mul_(step)
        u = torch.rand(q.shape, generator=generator, device=q.device, dtype=torch.float32)
        # u·step < |q| - lo  <=>  u < p; exactly on the grid (|q| = lo) it never rounds up.
        mag = lo.add_(step * (u.mul_(step) < mag - lo))
    idx = _magnitude_index(mag)
    return idx.add_((q < 0).view(torch.uint8), alpha=8)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., 2n] -> uint8 bytes [..., n]; element 2i low nibble, 2i+1 high nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 bytes [..., n] -> uint8 codes [..., 2n] (inverse of `pack_e2m1`)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes -> float32 values (same shape)."""
    return _value_table(codes.device)[codes.long()]


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
        return torch.div(1.0, global_encode_scale(self.global_amax))

    def codes(self) -> torch.Tensor:
        """Unpacked E2M1 codes, uint8 [..., Kp] (padded like `data`)."""
        return unpack_e2m1(self.data)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x̂ = value(code)·float(scale)·D in float32, cast to `dtype`; the original shape."""
        vals = e2m1_to_float(self.codes())  # [..., Kp]
        s = self.scale.to(torch.float32)
        if self.two_d:
            s = s.repeat_interleave(BLOCK, dim=0)  # [Mp, Kp/16]
        vals = (vals.unflatten(-1, (-1, BLOCK)) * s.unsqueeze(-1)).flatten(-2) * self.decode_scale
        vals = vals[tuple(slice(0, n) for n in self.shape)]
        return vals.to(dtype)


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
    if rht:
        x = rht_transform(x)
    xf = _pad_to(x.to(torch.float32).contiguous(), -1, BLOCK)
    if two_d:
        xf = _pad_to(xf, 0, BLOCK)
        mp, kp = xf.shape
        tiles = xf.view(mp // BLOCK, BLOCK, kp // BLOCK, BLOCK)
        block_amax = tiles.abs().amax(dim=(1, 3))  # [Mp/16, Kp/16]
    else:
        blocks = xf.unflatten(-1, (-1, BLOCK))
        block_amax = blocks.abs().amax(dim=-1)  # [..., Kp/16]
    # max over block amaxes == max |x| (padding is zeros); an empty tensor has amax 0.
    global_amax = block_amax.amax() if block_amax.numel() else xf.new_zeros(())

    s_enc = global_encode_scale(global_amax)
    s_dec = torch.div(1.0, s_enc)
    # TE's order: fold 1/6 into the global scale first, then multiply by the block amax.
    s = (block_amax * (s_enc * RCP_FP4_MAX)).clamp(max=FP32_MAX)
    scale = s.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)  # RNE cast
    # Multiplier m = 1/(s8·D), capped so that an all-zero block (s8 = 0) gives 0·FP32_MAX = 0.
    mult = torch.div(1.0, scale.to(torch.float32) * s_dec).clamp(max=FP32_MAX)

    if two_d:
        q = tiles * mult[:, None, :, None]
        q = q.view(mp, kp)
    else:
        q = (blocks * mult.unsqueeze(-1)).flatten(-2)
    q = q.clamp_(-FP4_MAX, FP4_MAX)
    codes = cast_to_e2m1(q, stochastic=stochastic, generator=generator)
    return NVFP4Tensor(
        data=pack_e2m1(codes),
        scale=scale,
        global_amax=global_amax.to(torch.float32),
        shape=shape,
        two_d=two_d,
        rht=rht,
    )
