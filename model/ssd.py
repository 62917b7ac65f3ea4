"""The Mamba-2 mixer's kernels in plain PyTorch: the SSD scan (Dao & Gu 2024, "Transformers are
SSMs"), the depthwise causal conv1d and the gated RMSNorm. They run on any device (CPU included)
and are the reference the fused mamba-ssm kernels are held to.

``ssd_chunk_scan`` is the chunked algorithm with mamba-ssm's ``mamba_chunk_scan_combined`` argument
conventions, with a hand-written backward (``ssd_chunked.ChunkScan``; autograd's was 2/3 of the time) that is
tested against autograd through ``ssd_naive``, the sequential recurrence, to 1e-9 in fp64.

Per head h (group g = h // (H/G)) the recurrence is
    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t ⊗ B_t        state: [P, N]
    y_t     = state_t · C_t + D_h * x_t        (then * silu(z_t) when z is given)
with dt = clamp(softplus(dt + dt_bias), *dt_limit). The state is kept in fp32 (fp64 for fp64
input) whatever the input dtype; y is returned in x's dtype.

Documents (``seq_idx``, int [B, L], non-decreasing along L as mamba-ssm expects): the state is reset
to zero where seq_idx changes, so no information crosses a document boundary. ``initial_states``
is the state before position 0 and belongs to the first document.

``causal_conv1d`` and ``gated_rms_norm`` follow causal-conv1d's ``causal_conv1d_fn`` and mamba-ssm's
``RMSNormGated``; like the fused kernels they compute in fp32 and return the input's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hymoe.model.ssd_chunked import ChunkScan, doc_masks

_INF = float("inf")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # fp64 stays fp64 (the oracle comparisons run at 1e-10); anything else runs in fp32.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, dtype):
    """dt [B, L, H] -> clamp(softplus(dt + dt_bias)) in ``dtype``."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, _INF):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _check_shapes(x, dt, A, B, C, D, z, initial_states):
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if dt.shape != (b, length, h) or A.shape != (h,):
        raise ValueError(
            f"dt must be [B, L, H]={b, length, h} and A [H]; got {dt.shape}, {A.shape}"
        )
    if B.shape != (b, length, g, n) or C.shape != B.shape or h % g != 0:
        raise ValueError(
            f"B, C must be [B, L, G, N] with H={h} divisible by G; got {B.shape}, {C.shape}"
        )
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"D must be [H] or [H, P]; got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}; got {tuple(z.shape)}")
    if initial_states is not None and initial_states.shape != (b, h, p, n):
        raise ValueError(f"initial_states must be [B, H, P, N]; got {tuple(initial_states.shape)}")


def _skip_and_gate(y, x, D, z, cd):
    """y += D * x; y *= silu(z). y, x, z: [B, L, H, P]; D: [H] or [H, P]."""
    if D is not None:
        y = y + x.to(cd) * (D.to(cd).unsqueeze(-1) if D.dim() == 1 else D.to(cd))
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y


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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan (mamba-ssm ``mamba_chunk_scan_combined`` semantics).

    Args:
        x: [B, L, H, P]; dt: [B, L, H] (raw, before bias/softplus); A: [H] negative (fp32);
        B, C: [B, L, G, N], G divides H; chunk_size: Q, any L is padded internally;
        D: [H] or [H, P] or None; z: [B, L, H, P] or None (output gate silu(z));
        dt_bias: [H] or None; dt_limit: (lo, hi) clamp after softplus;
        seq_idx: int [B, L] or None; initial_states: [B, H, P, N] or None.

    Returns:
        y [B, L, H, P] in x's dtype, and with ``return_final_states`` also the final state
        [B, H, P, N] in fp32 (fp64 for fp64 x) -- the state of each row's last document.

    Algorithm (Dao & Gu 2024, section 6): within a chunk the scan is a masked attention-like
    product, y_i = sum_{j<=i} (C_i·B_j) exp(cs_i - cs_j) dt_j x_j with cs the cumulative dt·A from
    the chunk start; each chunk's end state is carried to the next by an L/Q-step loop and read
    back through C. The backward is written by hand (``ChunkScan``).

    Cost: O(B·H·L·Q·(P + N/r)) for the intra-chunk part (r = H/G) plus O(B·H·L·P·N) for the
    states. For the backward it keeps two [B, H, L, Q] fp32 tensors (decay and score matrices),
    their [B, G, L, Q] C·B factor, three [B, L, H, P] ones and the L/Q chunk states per call;
    activation recomputation is the remedy at large L·H.
    """
    _check_shapes(x, dt, A, B, C, D, z, initial_states)
    bsz, length = x.shape[:2]
    cd = _compute_dtype(x)
    q = chunk_size
    nchunks = math.ceil(length / q)
    pad = nchunks * q - length

    dt_d = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, cd)
    if pad:  # zero padding at the end is inert: dt = 0 means no decay and no input
        x, dt_d = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt_d, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
    masks = doc_masks(seq_idx, bsz, nchunks, q, pad, cd, x.device)
    y, state = ChunkScan.apply(x, dt_d, A, B, C, D, initial_states, masks, q)
    y = y[:, :length]
    if z is not None:
        y = y * F.silu(z.to(cd))
    y = y.to(x.dtype)
    return (y, state) if return_final_states else y


def ssd_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, _INF),
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one token at a time: the test oracle. Same arguments and returns as
    ``ssd_chunk_scan`` (without ``chunk_size``); O(L) Python steps, so tests and debugging only."""
    _check_shapes(x, dt, A, B, C, D, z, initial_states)
    bsz, length, nheads, hdim = x.shape
    rep = nheads // B.shape[2]
    cd = _compute_dtype(x)
    dt_d = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit, cd)
    xf, Af = x.to(cd), A.to(cd)
    Bh = B.to(cd).repeat_interleave(rep, dim=2)  # [B, L, H, N]
    Ch = C.to(cd).repeat_interleave(rep, dim=2)
    state = (
        initial_states.to(cd)
        if initial_states is not None
        else xf.new_zeros(bsz, nheads, hdim, B.shape[3])
    )
    ys = []
    for t in range(length):
        if seq_idx is not None and t > 0:  # new document: forget everything
            state = state * (seq_idx[:, t] == seq_idx[:, t - 1]).to(cd)[:, None, None, None]
        dt_t = dt_d[:, t]  # [B, H]
        state = torch.exp(dt_t * Af)[..., None, None] * state + (
            (dt_t[..., None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        )
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = _skip_and_gate(torch.stack(ys, dim=1), x, D, z, cd).to(x.dtype)
    return (y, state) if return_final_states else y


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Depthwise causal convolution over the sequence, channels-last.

    Args:
        x: [B, L, D], any float dtype.
        weight: [D, W] depthwise taps; tap ``W-1`` multiplies the current position, tap ``W-1-s``
            the position ``s`` steps back (the layout of ``nn.Conv1d(D, D, W, groups=D).weight``
            squeezed, and of causal-conv1d's ``weight``).
        bias: [D] or None.
        seq_idx: int [B, L] document index of each token (non-decreasing along L, as mamba-ssm
            expects) or None. A tap reaching a token of another document contributes zero, i.e.
            the conv state is reset at each document boundary.
        activation: "silu" / "swish" (the same) or None.

    Returns:
        y: [B, L, D] in x's dtype,
        ``y[t] = act(bias + sum_k weight[:, k] * x[t - (W-1) + k])`` with zeros before position 0.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    _batch, seqlen, dim = x.shape
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"weight must be [D={dim}, W], got {tuple(weight.shape)}")
    width = weight.shape[1]
    cd = _compute_dtype(x)
    xf = x.to(cd)
    w = weight.to(cd)

    # W shifted multiply-adds instead of F.conv1d: the same cost for W=4, no [B, D, L] transposes,
    # and the document mask is applied per shift, which conv1d cannot do.
    y = xf * w[:, width - 1]
    for s in range(1, min(width, seqlen)):
        shifted = F.pad(xf[:, : seqlen - s], (0, 0, s, 0))  # shifted[t] = x[t - s], zero for t < s
        if seq_idx is not None:
            same_doc = F.pad(seq_idx[:, s:] == seq_idx[:, : seqlen - s], (s, 0))  # [B, L] bool
            shifted = shifted * same_doc.unsqueeze(-1).to(cd)
        y = y + shifted * w[:, width - 1 - s]
    if bias is not None:
        y = y + bias.to(cd)
    if activation is not None:
        y = F.silu(y)
    return y.to(x.dtype)


def gated_rms_norm(
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """mamba-ssm ``RMSNormGated``: RMSNorm with a SiLU gate and per-group statistics.

    Args:
        x: [..., D], any float dtype.
        z: [..., D] gate (same shape as x) or None (plain grouped RMSNorm).
        weight: [D] scale.
        group_size: the RMS statistic is taken over each run of ``group_size`` consecutive
            channels (Mamba-2 uses ``D / ngroups`` so that the norm does not mix SSM groups, which
            keeps it local to a tensor-parallel shard); None means the whole last dim.
        norm_before_gate: False (Mamba-2, Nemotron-H): ``rmsnorm(x * silu(z)) * weight``;
            True: ``rmsnorm(x) * weight * silu(z)``.

    Returns:
        [..., D] in x's dtype; statistics and products in fp32 (fp64 for fp64 input).
    """
    dim = x.shape[-1]
    group_size = dim if group_size is None else group_size
    if dim % group_size != 0:
        raise ValueError(f"group_size {group_size} must divide the last dim {dim}")
    cd = _compute_dtype(x)
    h = x.to(cd)
    gate = F.silu(z.to(cd)) if z is not None else None
    if gate is not None and not norm_before_gate:
        h = h * gate
    hg = h.unflatten(-1, (dim // group_size, group_size))
    hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + eps)
    out = hg.flatten(-2) * weight.to(cd)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype)
