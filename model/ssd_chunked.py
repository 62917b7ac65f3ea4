"""The chunked SSD scan's autograd function for ``hymoe.model.ssd.ssd_chunk_scan``: forward and a
hand-written backward (autograd's was 2/3 of the time), one ``bmm`` layout throughout, and the
per-chunk document masks that keep ``seq_idx`` documents apart. The conventions (shapes, dtypes,
the recurrence) are in ``hymoe.model.ssd``'s docstring; ``ssd_naive`` there is the reference
this is tested against.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

_INF = float("inf")


class DocMasks(NamedTuple):
    """Masks in the scan's head-major layout; True means "drop". Without seq_idx only the
    causal triangle: ``off`` is [Q, Q] and the three per-token masks are None.

    off [c, b, Q, Q]: pair (i, j) with j > i or in another document;
    not_end [c, b, Q]: token outside the document of the chunk's last token (its state does not
    leave the chunk); not_in [c, b, Q]: token that no longer sees the state carried into the
    chunk; reset [c, b]: the carried state does not survive the chunk; below [Q, Q]: j < i, as
    float (a multiplier).
    """

    off: torch.Tensor
    not_end: torch.Tensor | None
    not_in: torch.Tensor | None
    reset: torch.Tensor | None
    below: torch.Tensor


def doc_masks(seq_idx, bsz, nchunks, q, pad, dtype, device) -> DocMasks:
    tril = torch.ones(q, q, dtype=torch.bool, device=device).tril_()
    below = tril.tril(-1).to(dtype)
    if seq_idx is None:
        return DocMasks(~tril, None, None, None, below)
    # Padding takes the last token's document so that it never resets the state.
    sidx = torch.cat([seq_idx, seq_idx[:, -1:].expand(bsz, pad)], dim=1)
    sidx = sidx.view(bsz, nchunks, 1, q).permute(1, 2, 0, 3)  # [c, 1, b, Q]: the G axis is 1
    off = (sidx.unsqueeze(-1) != sidx.unsqueeze(-2)) | ~tril
    # The state entering chunk c belongs to the document of the token before the chunk (the first
    # token's document for chunk 0, which owns initial_states).
    doc_in = torch.cat([sidx[:1, ..., 0], sidx[:-1, ..., -1]], dim=0)  # [c, 1, b]
    return DocMasks(
        off, sidx != sidx[..., -1:], sidx != doc_in.unsqueeze(-1), sidx[..., -1] != doc_in, below
    )


def _to_heads(t: torch.Tensor, nchunks: int, q: int, ngroups: int) -> torch.Tensor:
    """[b, L, H, ...] -> strided view [H/G, c, G, b, Q, ...]; head g·H/G + r sits at [r, :, g]."""
    t = t.unflatten(1, (nchunks, q)).unflatten(3, (ngroups, -1))  # [b, c, Q, G, H/G, ...]
    return t.permute(4, 1, 3, 0, 2, *range(5, t.dim()))


def _from_heads(t: torch.Tensor) -> torch.Tensor:
    """[H/G, c, G, b, Q, ...] -> strided view [b, c, Q, G, H/G, ...]."""
    return t.permute(3, 1, 4, 2, 0, *range(5, t.dim()))


class ChunkScan(torch.autograd.Function):
    """The chunked scan with a hand-written backward; ``ssd_chunk_scan`` states the algorithm.

    Why not autograd: its backward of the einsum formulation spent most of its time copying
    permuted operands and re-reading the [H, c, Q, Q] decay matrices once per op. Here every
    tensor lives in one layout, [r, c, G, b, Q, ...] for head g·H/G + r and [c, G, b, Q, ...] for
    the per-group B and C, so that for each r the heads' operands and the groups' line up as one
    contiguous batch of n = c·G·b matrices: every product is a plain bmm (H/G of them where B or C
    meet per-head tensors), with no copies and B, C never repeated per head. The decay matrices
    are written four times in the forward and read as few times as the gradients need.

    Inputs, padded to a chunk multiple: x [b, L, H, P] any float dtype; dt [b, L, H] discretised,
    in the compute dtype cd; A [H]; B, C [b, L, G, N]; D [H], [H, P] or None; init [b, H, P, N] or
    None; masks from ``doc_masks``. Returns y = scan + D·x [b, L, H, P] and the final state
    [b, H, P, N], both in cd.
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, init, masks, q):
        cd, dev = dt.dtype, dt.device
        bsz, length, nheads, hdim = x.shape
        ngroups, dstate = B.shape[2], B.shape[3]
        rep, c = nheads // ngroups, length // q
        n = c * ngroups * bsz

        dt_h = _to_heads(dt, c, q, ngroups)  # [r, c, G, b, Q]
        X = torch.empty(rep, c, ngroups, bsz, q, hdim, dtype=cd, device=dev)
        torch.mul(_to_heads(x, c, q, ngroups), dt_h.unsqueeze(-1), out=X)  # x·dt
        Bg = _to_heads(B, c, q, ngroups)[0].to(cd).contiguous()  # [c, G, b, Q, N]
        Cg = _to_heads(C, c, q, ngroups)[0].to(cd).contiguous()
        A_h = A.to(cd).view(ngroups, rep).t()[:, None, :, None, None]
        dA = (dt_h * A_h).contiguous()  # [r, c, G, b, Q]
        if masks.not_end is None:
            cs = torch.cumsum(dA, dim=-1)  # log decay from the chunk start
        else:
            # The same, restarted at each document start (a [Q, Q] product with the same-document
            # triangle): a document's values then never round with another's, so a document's
            # output is bit-identical whatever the others hold.
            same = (~masks.off).to(cd)  # [c, 1, b, Q, Q]
            cs = torch.matmul(same, dA.permute(1, 2, 3, 4, 0)).permute(4, 0, 1, 2, 3).contiguous()

        # Intra-chunk: y_i = sum_j S_ij x_j dt_j with S = M * Ld, M = (C_i·B_j)[j <= i, same doc]
        # per group (shared by its H/G heads), Ld = exp(cs_i - cs_j) [j <= i] per head: one
        # subtraction of two cumsums within a chunk, as in mamba-ssm's kernels. Dropped pairs get
        # exp(-inf) = 0 rather than being left to M's zeros: exp of a positive difference (j > i
        # with dt < 0, or across a document start) could overflow, and inf·0 is NaN. The same
        # holds for w, e and decay below.
        M = torch.matmul(Cg, Bg.transpose(-1, -2)).masked_fill_(masks.off, 0.0)  # [c, G, b, Q, Q]
        Ld = torch.sub(cs.unsqueeze(-1), cs.unsqueeze(-2)).masked_fill_(masks.off, -_INF).exp_()
        S = Ld * M  # [r, c, G, b, Q, Q]
        Y = torch.bmm(S.view(-1, q, q), X.view(-1, q, hdim)).view(rep, n, q, hdim)

        # Each chunk's own state at its end: sum_j exp(cs_end - cs_j) x_j dt_j ⊗ B_j over the
        # document of the chunk's last token, written where the recurrence below turns it into
        # the state leaving chunk k.
        w = cs[..., -1:] - cs
        if masks.not_end is not None:
            w.masked_fill_(masks.not_end, -_INF)
        w = w.exp_()
        Xw = X * w.unsqueeze(-1)
        states = torch.empty(rep, c + 1, ngroups, bsz, hdim, dstate, dtype=cd, device=dev)
        Xw_r, Bg_n, Cg_n = Xw.view(rep, n, q, hdim), Bg.view(n, q, dstate), Cg.view(n, q, dstate)
        for r in range(rep):
            torch.bmm(Xw_r[r].transpose(1, 2), Bg_n, out=states[r, 1:].view(n, hdim, dstate))

        # Inter-chunk recurrence: L/Q steps of one [H, b, P, N] multiply-add, in place. After it
        # states[:, k] is the state entering chunk k and states[:, c] the final one.
        decay = cs[..., -1].clone()  # [r, c, G, b]
        if masks.reset is not None:
            decay.masked_fill_(masks.reset, -_INF)
        decay = decay.exp_()
        if init is None:
            states[:, 0] = 0.0
        else:
            states[:, 0] = init.to(cd).view(bsz, ngroups, rep, hdim, dstate).permute(2, 1, 0, 3, 4)
        for k in range(c):
            states[:, k + 1].addcmul_(states[:, k], decay[:, k, ..., None, None])

        # Carried state -> output: y_i += exp(cs_i) C_i · state_in.
        e = cs.clone()
        if masks.not_in is not None:
            e.masked_fill_(masks.not_in, -_INF)
        e = e.exp_()
        Coff = torch.empty(rep, n, q, hdim, dtype=cd, device=dev)
        for r in range(rep):
            torch.bmm(Cg_n, states[r, :c].view(n, hdim, dstate).transpose(1, 2), out=Coff[r])
        Y.addcmul_(Coff, e.view(rep, n, q, 1))

        y = torch.empty(bsz, c, q, ngroups, rep, hdim, dtype=cd, device=dev)
        Yb = _from_heads(Y.view(rep, c, ngroups, bsz, q, hdim))
        if D is None:
            y.copy_(Yb)
        else:
            xb = x.unflatten(1, (c, q)).unflatten(3, (ngroups, rep))
            torch.addcmul(Yb, xb, D.to(cd).view(ngroups, rep, -1), out=y)
        final = states[:, c].permute(2, 1, 0, 3, 4).reshape(bsz, nheads, hdim, dstate)

        ctx.save_for_backward(x, dt, A, D, S, Ld, M, X, Xw, w, Bg, Cg, states, decay, e, Coff)
        ctx.masks, ctx.q = masks, q
        ctx.init_dtype = None if init is None else init.dtype
        ctx.bc_dtype = B.dtype
        ctx.set_materialize_grads(False)
        return y.view(bsz, length, nheads, hdim), final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, D, S, Ld, M, X, Xw, w, Bg, Cg, states, decay, e, Coff = ctx.saved_tensors
        masks, q = ctx.masks, ctx.q
        cd, dev = dt.dtype, dt.device
        bsz, length, nheads, hdim = x.shape
        c, ngroups, dstate = Bg.shape[0], Bg.shape[1], Bg.shape[-1]
        rep, n = nheads // ngroups, c * ngroups * bsz
        if dy is None:
            dy = torch.zeros(bsz, length, nheads, hdim, dtype=cd, device=dev)
        dY = _to_heads(dy, c, q, ngroups).to(cd).contiguous().view(rep, n, q, hdim)
        Bg_n, Cg_n = Bg.view(n, q, dstate), Cg.view(n, q, dstate)

        # The gradient of dA = dt·A is gathered per term from the positions each decay spans
        # (da_t gets d/d log(decay) of every decay whose product includes a_t), not as the
        # reverse cumsum of a gradient of cs: that difference of two sums would lose the small
        # ones next to large ones (cs grows with dt < 0; the fp64 tests reach 1e18).
        # Big temporaries are few and reused (a fresh [H, L, P] tensor costs more in page faults
        # than the arithmetic on it), and products summed over P go through einsum's bmm.
        # Carried state -> output, through e = exp(cs_i): spans a_0..a_i.
        da_e = torch.einsum("rnqp,rnqp->rnq", dY, Coff).view_as(e).mul_(e)
        dYe = dY * e.view(rep, n, q, 1)  # reused below as scratch
        dC = torch.zeros(n, q, dstate, dtype=cd, device=dev)
        dstates = torch.empty(rep, c, ngroups, bsz, hdim, dstate, dtype=cd, device=dev)
        for r in range(rep):
            dC.baddbmm_(dYe[r], states[r, :c].view(n, hdim, dstate))
            torch.bmm(dYe[r].transpose(1, 2), Cg_n, out=dstates[r].view(n, hdim, dstate))

        # Recurrence, backwards: g is the gradient of the state leaving chunk k; it replaces
        # dstates[:, k] (then the gradient of chunk k's own state). Through the chunk decay
        # exp(cs_end), which spans the whole chunk: <g, state entering k> · decay.
        if dfinal is None:
            g = torch.zeros_like(states[:, 0])
        else:
            g = dfinal.to(cd).view(bsz, ngroups, rep, hdim, dstate).permute(2, 1, 0, 3, 4)
        da_decay = torch.empty_like(decay)  # [r, c, G, b]
        for k in range(c - 1, -1, -1):
            da_decay[:, k] = (g * states[:, k]).sum((-2, -1))
            g_in = torch.addcmul(dstates[:, k], g, decay[:, k, ..., None, None])
            dstates[:, k] = g
            g = g_in
        da_decay.mul_(decay)
        dinit = None
        if ctx.init_dtype is not None:
            dinit = g.permute(2, 1, 0, 3, 4).reshape(bsz, nheads, hdim, dstate).to(ctx.init_dtype)

        # Chunk states = Xw^T B, Xw = X * w.
        dX = torch.empty(rep, n, q, hdim, dtype=cd, device=dev)
        dB = torch.zeros(n, q, dstate, dtype=cd, device=dev)
        Xw_r = Xw.view(rep, n, q, hdim)
        for r in range(rep):
            dch = dstates[r].view(n, hdim, dstate)
            torch.bmm(Bg_n, dch.transpose(1, 2), out=dX[r])
            dB.baddbmm_(Xw_r[r], dch)
        dX = dX.view_as(X).mul_(w.unsqueeze(-1))
        # Through w_j = exp(cs_end - cs_j): spans a_{j+1}..a_end, so a_t gets the sum over j < t.
        da_w = torch.einsum("rcgbqp,rcgbqp->rcgbq", dX, X).cumsum(-1)

        # Intra-chunk.
        dX.view(-1, q, hdim).baddbmm_(S.view(-1, q, q).transpose(1, 2), dY.view(-1, q, hdim))
        dS = torch.bmm(dY.view(-1, q, hdim), X.view(-1, q, hdim).transpose(1, 2))
        dS = dS.view_as(Ld).mul_(Ld)
        dM = dS.sum(0).masked_fill_(masks.off, 0.0)  # [c, G, b, Q, Q]
        # Through Ld_ij = exp(a_{j+1} + ... + a_i): a_t gets the sum over i >= t > j, as the
        # column sums of K[i, t-1] = sum_{j <= t-1} dseg_ij over i >= t.
        dseg = dS.mul_(M)
        da_in = dseg.cumsum_(-1).mul_(masks.below).sum(-2)  # [..., t-1]
        dC += torch.matmul(dM, Bg).view(n, q, dstate)
        dB += torch.matmul(dM.transpose(-1, -2), Cg).view(n, q, dstate)

        # Back through cs = cumsum(dt·A) and X = x·dt.
        da = da_e.flip(-1).cumsum(-1).flip(-1) + da_decay.unsqueeze(-1)
        da[..., 1:] += da_w[..., :-1] + da_in[..., :-1]
        dt_h = _to_heads(dt, c, q, ngroups)
        dA = None
        if ctx.needs_input_grad[2]:
            dA = (da * dt_h).sum((1, 3, 4)).t().reshape(nheads).to(A.dtype)
        scratch = dYe.view_as(X)
        ddt = torch.mul(dX, _to_heads(x, c, q, ngroups), out=scratch).sum(-1)
        ddt.addcmul_(da, A.to(cd).view(ngroups, rep).t()[:, None, :, None, None])
        ddt = _from_heads(ddt).reshape(bsz, length, nheads)
        dx = dD = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty(bsz, c, q, ngroups, rep, hdim, dtype=cd, device=dev)
            dt_b = dt.unflatten(1, (c, q)).unflatten(3, (ngroups, rep)).unsqueeze(-1)
            torch.mul(_from_heads(dX), dt_b, out=dx)
            if D is not None:
                dyb = dy.unflatten(1, (c, q)).unflatten(3, (ngroups, rep))
                dx.addcmul_(dyb, D.to(cd).view(ngroups, rep, -1))
            dx = dx.view(bsz, length, nheads, hdim).to(x.dtype)
        if D is not None and ctx.needs_input_grad[5]:
            dD = torch.mul(dy, x, out=scratch.view(bsz, length, nheads, hdim)).sum((0, 1))
            dD = (dD.sum(-1) if D.dim() == 1 else dD).to(D.dtype)

        def per_token(t):  # [c·G·b, Q, N] -> [b, L, G, N]
            t = t.view(c, ngroups, bsz, q, dstate).permute(2, 0, 3, 1, 4)
            return t.reshape(bsz, length, ngroups, dstate).to(ctx.bc_dtype)

        return dx, ddt, dA, per_token(dB), per_token(dC), dD, dinit, None, None
