"""Which Mamba-2 kernels run: mamba-ssm's and causal-conv1d's fused kernels on CUDA when installed,
hymoe's own PyTorch kernels (``hymoe.model.ssd``) everywhere else.

``ssd_chunk_scan`` and ``causal_conv1d`` here take the arguments of the functions of the same name
in ``hymoe.model.ssd`` and return the same results; the Mamba mixer calls these. For CUDA tensors
they use, when they load:
  * the SSD scan: mamba-ssm's Triton ``mamba_chunk_scan_combined`` (pure Triton, no compiled code);
  * the conv: causal-conv1d's ``causal_conv1d_fn``, which needs its compiled ``causal_conv1d_cuda``.
CPU tensors always take hymoe's kernels. ``HYMOE_SSD_KERNELS=hymoe`` (or ``set_kernels("hymoe")``)
is the one switch that forces hymoe's kernels on CUDA too; the default is ``auto``. The first CUDA
call logs one line saying which kernels are used and, for any that did not load, why.

mamba-ssm's package ``__init__`` imports its CUDA extension ``selective_scan_cuda`` (and modules
that need it), so ``import mamba_ssm.ops.triton...`` fails wherever that extension was not built
-- e.g. the pure-Python wheel built with ``MAMBA_SKIP_CUDA_BUILD=TRUE`` -- although the SSD path
needs none of it. The loader therefore tries the ordinary import first and, if it fails, imports
the Triton submodules with an unexecuted ``mamba_ssm`` package object in ``sys.modules`` for the
duration of the import only (so a later ``import mamba_ssm`` still behaves as installed).

Tested against hymoe's scan: tests/test_ssd_kernels.py (Triton's interpreter on CPU, fp32, outputs
and gradients) and benchmarks/ssd_kernels_check.py (CUDA, fp32 and bf16, with timings).
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch
from hymoe.model import ssd

log = logging.getLogger(__name__)

KERNEL_MODES = ("auto", "hymoe")
_INF = float("inf")


class Kernels(NamedTuple):
    """The fused kernels that loaded (None: hymoe's is used) and why each other one did not."""

    scan: Callable | None
    conv: Callable | None
    scan_reason: str
    conv_reason: str

    def describe(self) -> str:
        scan = ("mamba-ssm Triton mamba_chunk_scan_combined" if self.scan
                else f"hymoe ssd_chunk_scan ({self.scan_reason})")
        conv = ("causal-conv1d causal_conv1d_fn" if self.conv
                else f"hymoe causal_conv1d ({self.conv_reason})")
        return f"Mamba-2 kernels on CUDA: scan = {scan}; conv1d = {conv}"


def set_kernels(mode: str) -> None:
    """"auto": the fused kernels for CUDA tensors when they load; "hymoe": always hymoe's own."""
    global _mode
    if mode not in KERNEL_MODES:
        raise ValueError(f"HYMOE_SSD_KERNELS must be one of {KERNEL_MODES}, got {mode!r}")
    _mode = mode


set_kernels(os.environ.get("HYMOE_SSD_KERNELS", "auto"))


def _import_skipping_package_init(name: str):
    """Import module ``name`` (a.b.c) with its top-level package present but not executed."""
    top = name.split(".")[0]
    if top in sys.modules:  # already imported (fully, or by another caller): nothing to skip
        return importlib.import_module(name)
    spec = importlib.machinery.PathFinder.find_spec(top)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"{top} is not installed")
    sys.modules[top] = importlib.util.module_from_spec(spec)  # __path__ set, __init__ not run
    try:
        return importlib.import_module(name)
    finally:
        # Only the package object goes: the loaded submodules keep the functions they imported.
        del sys.modules[top]


def load_kernels() -> Kernels:
    """Import the fused kernels now (uncached; ``kernels()`` is the cached form). Any failure,
    ImportError or RuntimeError (a triton without its toolchain, a CUDA library missing), leaves
    hymoe's kernel in place and is reported in the reason."""
    scan, scan_reason = None, ""
    module = "mamba_ssm.ops.triton.ssd_combined"
    try:
        scan = importlib.import_module(module).mamba_chunk_scan_combined
    except (ImportError, RuntimeError, OSError) as e:  # e.g. no selective_scan_cuda
        try:
            scan = _import_skipping_package_init(module).mamba_chunk_scan_combined
        except (ImportError, RuntimeError, OSError, AttributeError) as e2:
            scan_reason = f"mamba-ssm not loadable: {type(e2).__name__}: {e2}"
            if not isinstance(e, ModuleNotFoundError):
                scan_reason += f" (after {type(e).__name__}: {e})"
    conv, conv_reason = None, ""
    try:
        import causal_conv1d_cuda  # noqa: F401 - causal_conv1d_fn is a thin wrapper around it
        from causal_conv1d import causal_conv1d_fn as conv
    except (ImportError, RuntimeError, OSError) as e:
        conv_reason = f"causal-conv1d's CUDA extension not loadable: {type(e).__name__}: {e}"
    return Kernels(scan, conv, scan_reason, conv_reason)


@functools.cache
def kernels() -> Kernels:
    """The fused kernels, loaded once per process; logs which kernels CUDA tensors get."""
    k = load_kernels()
    # WARNING so that the one line shows without any logging set-up (hymoe configures none).
    log.warning("hymoe: %s", k.describe())
    return k


def _kernels_for(t: torch.Tensor) -> Kernels | None:
    """The fused kernels for tensor t, or None for hymoe's own (CPU, or forced by the switch)."""
    if _mode == "hymoe" or t.device.type != "cuda":
        return None
    return kernels()


def _seq_idx_int32(seq_idx: torch.Tensor | None) -> torch.Tensor | None:
    # Both fused kernels want contiguous int32. mamba-ssm's scan also compares the first token's
    # document with 0 to decide whether initial_states applies; hymoe gives initial_states to the
    # first document whatever its number, so documents are renumbered from 0 (only changes matter).
    if seq_idx is None:
        return None
    return (seq_idx - seq_idx[:, :1]).to(torch.int32).contiguous()


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, _INF),
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
):
    """``hymoe.model.ssd.ssd_chunk_scan`` (same arguments, shapes and dtypes: x [B, L, H, P],
    dt [B, L, H], A [H] fp32, B/C [B, L, G, N], D [H] or [H, P], dt_bias [H], seq_idx int [B, L];
    y [B, L, H, P] in x's dtype, final state fp32), on mamba-ssm's Triton kernels for CUDA
    tensors when they load. Differences are rounding only: in bf16 mamba-ssm keeps the states
    passed between chunks in bf16 where hymoe keeps fp32."""
    k = _kernels_for(x)
    if k is None or k.scan is None:
        return ssd.ssd_chunk_scan(
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
            dt_limit=dt_limit, seq_idx=seq_idx, initial_states=initial_states,
            return_final_states=return_final_states,
        )
    return _mamba_scan(
        k.scan, x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
        dt_limit=dt_limit, seq_idx=seq_idx, initial_states=initial_states,
        return_final_states=return_final_states,
    )


def _mamba_scan(scan, x, dt, A, B, C, chunk_size, *, D, z, dt_bias, dt_softplus, dt_limit,
                seq_idx, initial_states, return_final_states):
    """The argument mapping onto ``mamba_chunk_scan_combined`` (its layouts are hymoe's)."""
    return scan(
        x, dt, A.float(), B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
        initial_states=initial_states, seq_idx=_seq_idx_int32(seq_idx),
        dt_softplus=dt_softplus,
        # mamba-ssm skips the clamp only for exactly the tuple (0.0, inf).
        dt_limit=(float(dt_limit[0]), float(dt_limit[1])),
        return_final_states=return_final_states,
    )


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """``hymoe.model.ssd.causal_conv1d`` (x [B, L, D] channels-last, weight [D, W], bias [D],
    seq_idx int [B, L]; y [B, L, D] in x's dtype), on causal-conv1d's CUDA kernel for CUDA tensors
    when its extension loads."""
    k = _kernels_for(x)
    if k is None or k.conv is None:
        return ssd.causal_conv1d(x, weight, bias, seq_idx=seq_idx, activation=activation)
    return _cuda_conv(k.conv, x, weight, bias, seq_idx, activation)


def _cuda_conv(conv, x, weight, bias, seq_idx, activation):
    """The layout mapping onto ``causal_conv1d_fn``: it takes x as [B, D, L]; with seq_idx only
    the channels-last memory layout (stride 1 along D), which is x [B, L, D] contiguous,
    transposed."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    y = conv(
        x.contiguous().transpose(1, 2), weight.contiguous(), bias, seq_idx=_seq_idx_int32(seq_idx),
        activation=activation,
    )
    return y.transpose(1, 2)
