"""The quantizer input classes that the Triton kernels are checked on, in Triton's interpreter
(tests/test_precision_triton.py) and on a GPU (benchmarks/triton_check.py). No pytest here: the GPU
check imports it from the working tree."""

from __future__ import annotations

import torch


def quantizer_inputs(large: bool = False) -> dict[str, torch.Tensor]:
    """CPU tensors by name; `large` adds sizes that need many programs per launch and every tile
    shape the kernel wrappers choose (for compiled kernels: the interpreter is too slow)."""
    g = torch.Generator().manual_seed(0)
    n = torch.randn(20, 48, generator=g)
    zero_blocks = n.clone()
    zero_blocks[:, 16:32] = 0  # all-zero 1D blocks
    zero_blocks[:16, :16] = 0  # an all-zero 2D tile
    nan = torch.full((16, 32), 0.5)
    nan[3, 5] = float("nan")
    inf = torch.full((16, 32), 0.5)
    inf[7, 1] = float("inf")
    out = {
        "normal": n,
        "bf16": (n * 3).bfloat16(),
        "heavy": n / torch.rand(20, 48, generator=g).clamp(min=1e-6),
        # k·0.375 hits every E2M1 midpoint once the block scale is 1 (TE's ties).
        "midpoints": torch.randint(-12, 13, (16, 48), generator=g) / 2.0 * 0.75,
        "extreme": n * torch.exp(torch.randn(20, 48, generator=g) * 8),
        "huge": n * 1e37,
        "tiny": n * 1e-40,  # subnormal amax: the global scale saturates
        "zero_blocks": zero_blocks,
        "zero": torch.zeros(17, 32),
        "negzero": -torch.zeros(16, 16),
        "odd": torch.randn(5, 37, generator=g).bfloat16(),
        "3d": torch.randn(2, 3, 32, generator=g),
        "nan": nan,
        "inf": inf,
    }
    if large:
        out["large_fp32"] = torch.randn(1000, 4128, generator=g) * 3
        out["large_bf16"] = torch.randn(4096, 1040, generator=g).bfloat16()
        out["large_transposed"] = torch.randn(2048, 1536, generator=g).t()
    return out
