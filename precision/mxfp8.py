"""Emulated MXFP8 (OCP Microscaling): E4M3 elements, one E8M0 power-of-two scale per 32 elements.

Blocks are 32 consecutive elements along the last dim; no global scale. Two rules for the shared
exponent are provided:
- "floor" (default): torchao `to_mx`'s default, E = floor(log2(amax)) - emax(E4M3) with emax = 8,
  i.e. the OCP spec's rule; amax up to 1.75·2^9·2^E can saturate to 448.
- "rceil": Transformer Engine's MXFP8 rule (TE 2.20 kernels, `float_to_e8m0(amax * (1/448))`
  rounding up), E = ceil(log2(amax/448)); never saturates, one binade less resolution at worst.
Layout for x [..., K] with Kp = K rounded up to a multiple of 32 (zero padding, cut by dequantize):
`data` float8_e4m3fn [..., Kp], `scale` uint8 [..., Kp/32] (E8M0 biased exponent, 2^(scale-127);
255 is NaN).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from . import nvfp4
from .formats import E4M3_EMAX, E4M3_MAX, E8M0_BIAS, E8M0_NAN, RCP_E4M3_MAX
from .formats import MXFP8_BLOCK as BLOCK

SCALING_MODES = ("floor", "rceil")


@dataclasses.dataclass
class MXFP8Tensor:
    """An MXFP8-quantized tensor (layout in the module docstring)."""

    data: torch.Tensor  # float8_e4m3fn [..., Kp]
    scale: torch.Tensor  # uint8 [..., Kp/32], E8M0 biased exponents
    shape: torch.Size  # the original (unpadded) shape

    def scale_float(self) -> torch.Tensor:
        """The block scales 2^(scale-127) as float32 [..., Kp/32] (NaN for 255)."""
        s = torch.ldexp(
            torch.ones_like(self.scale, dtype=torch.float32), self.scale.int() - E8M0_BIAS
        )
        return torch.where(self.scale == E8M0_NAN, torch.nan, s)

    def any_nonzero(self) -> torch.Tensor:
        """Whether any dequantized value is non-zero, bool 0-dim on the device (no sync); E8M0
        scales are never zero, so the elements decide."""
        return ((self.data.view(torch.uint8) & 0x7F) != 0).any()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """float(data)·2^(scale-127) in float32 (exact), cast to `dtype`; the original shape."""
        vals = self.data.to(torch.float32).unflatten(-1, (-1, BLOCK))
        vals = vals * self.scale_float().unsqueeze(-1)
        return vals.flatten(-2)[..., : self.shape[-1]].to(dtype)


def _exponent_field(v: torch.Tensor) -> torch.Tensor:
    """The 8-bit biased exponent field of float32 values, int32."""
    return (v.view(torch.int32) >> 23) & 0xFF


def _scale_floor(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao `to_mx` ScaleCalculationMode.FLOOR: (biased uint8 scale, float32 divisor)."""
    unbiased = (_exponent_field(amax) - E8M0_BIAS - E4M3_EMAX).clamp_(-E8M0_BIAS, E8M0_BIAS + 1)
    biased = torch.where(torch.isnan(amax), E8M0_NAN, unbiased + E8M0_BIAS).to(torch.uint8)
    # torchao divides by max(2^(biased-127), 2^-126): a block with biased exponent 0 (amax below
    # ~2^-118) is scaled by 2^-126 although E8M0 0 means 2^-127. Matched here for identical codes;
    # `dequantize` follows the E8M0 meaning (such blocks come back at half their value).
    tiny = torch.finfo(torch.float32).tiny
    divisor = (biased.to(torch.int32) << 23).view(torch.float32).clamp(min=tiny)
    return biased, divisor


def _scale_rceil(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TE's rule: E8M0 of amax·fl(1/448) rounded up (saturating finite): (biased scale, divisor)."""
    v = amax * RCP_E4M3_MAX
    bits = v.view(torch.int32)
    exp = _exponent_field(v)
    mant = bits & 0x7FFFFF
    # Round up when there is a mantissa, except at the top (0xFE saturates) and for subnormals at
    # or below half of the smallest normal (TE's software path, equal to `cvt.rp.satfinite.ue8m0`).
    up = (mant > 0) & (exp != 0xFE) & ~((exp == 0) & (mant <= 0x400000))
    biased = exp + up
    biased = torch.where(torch.isinf(v), 0xFE, biased)
    biased = torch.where(torch.isnan(v), E8M0_NAN, biased).to(torch.uint8)
    # TE multiplies by 2^(127-biased); dividing by the power of two 2^(biased-127) is the same
    # correctly rounded result. (TE uses 2^127 as the reciprocal for biased 0, i.e. 2^-127.)
    divisor = torch.ldexp(torch.ones_like(v), biased.to(torch.int32) - E8M0_BIAS)
    return biased, divisor


def quantize(x: torch.Tensor, *, scaling_mode: str = "floor") -> MXFP8Tensor:
    """Quantize x [..., K] (float32/bfloat16/float16) to MXFP8 along the last dim.

    scaling_mode: "floor" (torchao `to_mx` default) or "rceil" (Transformer Engine); see module doc.
    Elements are x / 2^E clamped to ±448 and cast to E4M3 with round-to-nearest-even.
    """
    if scaling_mode not in SCALING_MODES:
        raise ValueError(f"scaling_mode must be one of {SCALING_MODES}, got {scaling_mode!r}")
    if not x.is_floating_point():
        raise TypeError(f"MXFP8 quantize needs a floating-point tensor, got {x.dtype}")
    shape = x.shape
    kernels = nvfp4.triton_for(x)  # CUDA: the Triton kernel, same bits (nvfp4.py's switch)
    if kernels is not None:
        data, scale = kernels.mxfp8_quantize(x, scaling_mode)
        return MXFP8Tensor(data=data, scale=scale, shape=shape)
    xf = x.to(torch.float32).contiguous()
    extra = -xf.shape[-1] % BLOCK
    if extra:
        xf = F.pad(xf, (0, extra))
    blocks = xf.unflatten(-1, (-1, BLOCK))
    amax = blocks.abs().amax(dim=-1)  # [..., Kp/32]
    biased, divisor = (_scale_floor if scaling_mode == "floor" else _scale_rceil)(amax)
    # Clamp before the cast: the floor rule lets amax exceed 448·2^E (saturate, as torchao does).
    data = (blocks / divisor.unsqueeze(-1)).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return MXFP8Tensor(data=data.flatten(-2), scale=biased, shape=shape)
