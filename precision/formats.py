"""The numbers that define NVFP4 and MXFP8: element and scale formats, block sizes, rounding
boundaries. One home for the eager quantizers (nvfp4.py, mxfp8.py) and the Triton kernels
(triton_kernels.py), which must use the same float32 constants to give the same bits.
"""

from __future__ import annotations

import torch

FP32_MAX = torch.finfo(torch.float32).max

# E2M1, NVFP4's element: code c = sign*8 + index; code 8 is negative zero (kept: TE gives it to
# small negatives).
FP4_MAX = 6.0
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = E2M1_MAGNITUDES + tuple(-v for v in E2M1_MAGNITUDES)
# fl32(1/6) as a Python float that is exactly representable in float32, so float32 arithmetic with
# it matches TE's `torch.reciprocal(6.0)` in float32.
RCP_FP4_MAX = torch.reciprocal(torch.tensor(FP4_MAX, dtype=torch.float32)).item()


def _down(v: float) -> float:
    """The float32 just below v, as a Python float."""
    return torch.nextafter(torch.tensor(v), torch.tensor(0.0)).item()


# A magnitude above boundary i rounds to an index > i. Ties that go down to an even index (0.25->0,
# 1.25->1, 2.5->2, 5->4) sit exactly on their boundary (strict '>'); for the ties that go up
# (0.75->1, 1.75->2, 3.5->4) the boundary is moved one float32 ulp down so that the tie counts.
RTN_BOUNDARIES = (0.25, _down(0.75), 1.25, _down(1.75), 2.5, _down(3.5), 5.0)

# E4M3: NVFP4's block scale and MXFP8's element.
E4M3_MAX = 448.0
E4M3_EMAX = 8  # floor(log2(448))
# fl32(1/448) as an exactly representable Python float (TE multiplies by it, it does not divide).
RCP_E4M3_MAX = torch.reciprocal(torch.tensor(E4M3_MAX, dtype=torch.float32)).item()

# E8M0: MXFP8's block scale, a biased power-of-two exponent.
E8M0_BIAS = 127
E8M0_NAN = 255

NVFP4_BLOCK = 16  # elements per scale (a 16x16 tile with 2D scaling)
MXFP8_BLOCK = 32
