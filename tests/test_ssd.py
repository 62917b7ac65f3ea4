"""Pure-PyTorch Mamba-2 kernels (hymoe.model.ssd) against a sequential-loop
oracle, finite differences and hand computations. CPU only, a few seconds."""

import math
import time

import pytest
import torch
import torch.nn.functional as F
from hymoe.model.ssd import causal_conv1d, gated_rms_norm, ssd_chunk_scan, ssd_naive

F64, F32 = torch.float64, torch.float32
CHUNK = 16


def make_inputs(b=2, L=37, h=4, p=8, g=2, n=16, dtype=F64, seed=0, d_per_channel=False):
    """Random scan inputs; dt is raw (before dt_bias and softplus), A negative as in Mamba-2."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(dtype)

    return {
        "x": r(b, L, h, p),
        "dt": r(b, L, h) - 1.0,
        "A": -torch.rand(h, generator=gen, dtype=F64).to(dtype) - 0.3,
        "B": r(b, L, g, n, scale=0.5),
        "C": r(b, L, g, n, scale=0.5),
        "D": r(h, p) if d_per_channel else r(h),
        "dt_bias": r(h, scale=0.3),
    }


def doc_seq_idx(b, L, starts):
    """int32 [b, L] document index: document k starts at position starts[k] (starts[0] == 0)."""
    idx = torch.zeros(b, L, dtype=torch.int32)
    for s in starts[1:]:
        idx[:, s:] += 1
    return idx


CASES = {
    "L_not_multiple_G1": {"L": 37, "g": 1},
    "G2_D_per_channel_z": {"L": 70, "g": 2, "d_per_channel": True, "z": True},
    "dt_limit": {"L": 50, "g": 2, "dt_limit": (0.05, 0.6)},
    "initial_and_final_states": {"L": 41, "g": 4, "init": True},
    "L_shorter_than_chunk": {"L": 5, "g": 2, "init": True, "z": True},
}


def build_case(name, dtype):
    cfg = dict(CASES[name])
    use_z, use_init, dt_limit = (
        cfg.pop("z", False),
        cfg.pop("init", False),
        cfg.pop("dt_limit", None),
    )
    inp = make_inputs(dtype=dtype, **cfg)
    b, L, h, p = inp["x"].shape
    gen = torch.Generator().manual_seed(1)
    if use_z:
        inp["z"] = torch.randn(b, L, h, p, generator=gen, dtype=F64).to(dtype)
    if use_init:
        inp["initial_states"] = torch.randn(
            b, h, p, inp["B"].shape[-1], generator=gen, dtype=F64
        ).to(dtype)
    if dt_limit is not None:
        inp["dt_limit"] = dt_limit
    return inp


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (F32, 1e-5)])
def test_chunked_matches_naive(name, dtype, tol):
    inp = build_case(name, dtype)
    y, final = ssd_chunk_scan(chunk_size=CHUNK, return_final_states=True, **inp)
    y_ref, final_ref = ssd_naive(return_final_states=True, **inp)
    assert y.dtype == dtype and y.shape == inp["x"].shape
    assert final.dtype == dtype and final.shape == final_ref.shape
    scale = max(1.0, y_ref.abs().max().item())
    torch.testing.assert_close(y, y_ref, rtol=0, atol=tol * scale)
    torch.testing.assert_close(
        final, final_ref, rtol=0, atol=tol * max(1.0, final_ref.abs().max().item())
    )


def test_bf16_input_keeps_fp32_state():
    inp = build_case("G2_D_per_channel_z", F32)
    bf = {
        k: (v.bfloat16() if k not in ("A", "dt_bias") and torch.is_tensor(v) else v)
        for k, v in inp.items()
    }
    y, final = ssd_chunk_scan(chunk_size=CHUNK, return_final_states=True, **bf)
    assert y.dtype == torch.bfloat16 and final.dtype == F32
    up = {k: (v.float() if torch.is_tensor(v) else v) for k, v in bf.items()}  # same values, fp32
    torch.testing.assert_close(y, ssd_naive(**up).bfloat16(), rtol=1e-2, atol=1e-2)


def test_noncontiguous_inputs_from_a_fused_projection():
    """As the mixer calls it: x, B, C, dt are strided slices of one projection, L a chunk multiple."""
    b, L, h, p, g, n = 2, 32, 4, 8, 2, 16
    proj = torch.randn(b, L, h * p + 2 * g * n + h, dtype=F64)
    x, B, C, dt = torch.split(proj, [h * p, g * n, g * n, h], dim=-1)
    args = (
        x.reshape(b, L, h, p),
        dt,
        -torch.rand(h, dtype=F64) - 0.3,
        B.reshape(b, L, g, n),
        C.reshape(b, L, g, n),
    )
    assert not args[0].is_contiguous() and not args[1].is_contiguous()
    seq = doc_seq_idx(b, L, [0, 16])
    y = ssd_chunk_scan(*args, chunk_size=CHUNK, seq_idx=seq)
    y_ref = ssd_chunk_scan(*(a.contiguous() for a in args), chunk_size=CHUNK, seq_idx=seq)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    xbc = proj[..., : h * p + 2 * g * n]
    w = torch.randn(xbc.shape[-1], 4, dtype=F64)
    torch.testing.assert_close(
        causal_conv1d(xbc, w, seq_idx=seq), causal_conv1d(xbc.contiguous(), w, seq_idx=seq)
    )


GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "z", "initial_states")


def _grads(fn, inp, **kw):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items() if k in GRAD_NAMES}
    y, final = fn(**{**inp, **leaves}, return_final_states=True, **kw)
    gen = torch.Generator().manual_seed(7)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=F64)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=gen, dtype=F64)).sum()
    loss.backward()
    return {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("name", ["G2_D_per_channel_z", "initial_and_final_states", "dt_limit"])
def test_gradients_match_naive(name):
    inp = build_case(name, F64)
    inp["seq_idx"] = doc_seq_idx(inp["x"].shape[0], inp["x"].shape[1], [0, 11, 32])
    g = _grads(ssd_chunk_scan, inp, chunk_size=CHUNK)
    g_ref = _grads(ssd_naive, inp)
    assert set(g) >= {"x", "dt", "A", "B", "C", "D", "dt_bias"}
    for k in g:
        assert torch.isfinite(g[k]).all(), k
        torch.testing.assert_close(
            g[k], g_ref[k], rtol=1e-9, atol=1e-9, msg=lambda m, k=k: f"{k}: {m}"
        )


def test_gradcheck_tiny():
    inp = make_inputs(b=1, L=7, h=2, p=2, g=1, n=3, d_per_channel=True)
    names = ["x", "dt", "A", "B", "C", "D", "dt_bias"]
    seq = doc_seq_idx(1, 7, [0, 3])  # a boundary inside the first chunk

    def f(*args):
        return ssd_chunk_scan(**dict(zip(names, args)), chunk_size=4, seq_idx=seq)

    args = tuple(inp[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "raw_dt,softplus", [(-40.0, True), (40.0, True), (1e3, False), (0.0, False)]
)
def test_extreme_dt_grads_finite(raw_dt, softplus):
    """A·dt -> 0 (tiny dt) and A·dt -> very negative (huge dt): no NaN/inf anywhere."""
    inp = make_inputs(L=40, g=2)
    inp["dt"] = torch.full_like(inp["dt"], raw_dt)
    inp["A"] = inp["A"] * 20.0  # down to ~ -26 per unit dt
    inp["dt_softplus"] = softplus
    inp["seq_idx"] = doc_seq_idx(2, 40, [0, 16, 21])
    g = _grads(ssd_chunk_scan, inp, chunk_size=CHUNK)
    for k, v in g.items():
        assert torch.isfinite(v).all(), k
    g_ref = _grads(ssd_naive, inp)
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-8, atol=1e-8)


# Boundaries: 11 is inside chunk 0, 32 is exactly a chunk edge (chunk 16), 45 inside chunk 2.
DOC_STARTS = [0, 11, 32, 45]
SEQ_L = 53


def _doc_ranges():
    ends = DOC_STARTS[1:] + [SEQ_L]
    return list(zip(DOC_STARTS, ends))


def _perturb(inp, keys, s, e, seed):
    out = dict(inp)
    gen = torch.Generator().manual_seed(seed)
    for k in keys:
        v = inp[k].clone()
        v[:, s:e] += torch.randn(v[:, s:e].shape, generator=gen, dtype=v.dtype)
        out[k] = v
    return out


def test_seq_idx_scan_isolates_documents():
    inp = build_case("G2_D_per_channel_z", F64)
    inp = {k: (v[:, :SEQ_L] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inp.items()}
    inp["initial_states"] = torch.randn(2, 4, 8, 16, dtype=F64)
    seq = doc_seq_idx(2, SEQ_L, DOC_STARTS)
    y, final = ssd_chunk_scan(chunk_size=CHUNK, seq_idx=seq, return_final_states=True, **inp)
    y_ref, final_ref = ssd_naive(seq_idx=seq, return_final_states=True, **inp)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=0, atol=1e-10)

    for d, (s, e) in enumerate(_doc_ranges()):
        # Perturbing one document leaves every other document's output bit-identical.
        y_p = ssd_chunk_scan(
            chunk_size=CHUNK, seq_idx=seq, **_perturb(inp, ("x", "dt", "B", "C", "z"), s, e, d)
        )
        outside = torch.ones(SEQ_L, dtype=torch.bool)
        outside[s:e] = False
        assert torch.equal(y_p[:, outside], y[:, outside]), f"document {d} leaked"
        assert not torch.equal(y_p[:, s:e], y[:, s:e])
        # Packed output equals the document run alone (initial state belongs to the first one).
        alone = {k: (v[:, s:e] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inp.items()}
        if d > 0:
            alone["initial_states"] = None
        y_d, final_d = ssd_chunk_scan(chunk_size=CHUNK, return_final_states=True, **alone)
        torch.testing.assert_close(y[:, s:e], y_d, rtol=0, atol=1e-10)
    torch.testing.assert_close(final, final_d, rtol=0, atol=1e-10)  # final = last document's


def test_causal_conv1d_matches_conv1d():
    gen = torch.Generator().manual_seed(0)
    for L in (37, 2):  # 2 < W: only the taps that exist
        x = torch.randn(2, L, 24, generator=gen, dtype=F64)
        w = torch.randn(24, 4, generator=gen, dtype=F64)
        bias = torch.randn(24, generator=gen, dtype=F64)
        ref = F.conv1d(x.transpose(1, 2), w.unsqueeze(1), bias, padding=3, groups=24)[..., :L]
        ref = ref.transpose(1, 2)
        torch.testing.assert_close(
            causal_conv1d(x, w, bias, activation=None), ref, rtol=0, atol=1e-12
        )
        torch.testing.assert_close(causal_conv1d(x, w, bias), F.silu(ref), rtol=0, atol=1e-12)
    y16 = causal_conv1d(x.bfloat16(), w.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert torch.autograd.gradcheck(
        lambda a, b, c: causal_conv1d(a, b, c, seq_idx=doc_seq_idx(2, 9, [0, 2, 5])),
        (
            torch.randn(2, 9, 3, dtype=F64, requires_grad=True),
            torch.randn(3, 4, dtype=F64, requires_grad=True),
            torch.randn(3, dtype=F64, requires_grad=True),
        ),
    )


def test_causal_conv1d_seq_idx_isolates_documents():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, SEQ_L, 24, generator=gen, dtype=F64)
    w, bias = (
        torch.randn(24, 4, generator=gen, dtype=F64),
        torch.randn(24, generator=gen, dtype=F64),
    )
    seq = doc_seq_idx(2, SEQ_L, DOC_STARTS)
    y = causal_conv1d(x, w, bias, seq_idx=seq)
    for d, (s, e) in enumerate(_doc_ranges()):
        x_p = _perturb({"x": x}, ("x",), s, e, d)["x"]
        y_p = causal_conv1d(x_p, w, bias, seq_idx=seq)
        outside = torch.ones(SEQ_L, dtype=torch.bool)
        outside[s:e] = False
        assert torch.equal(y_p[:, outside], y[:, outside]), f"document {d} leaked"
        torch.testing.assert_close(y[:, s:e], causal_conv1d(x[:, s:e], w, bias), rtol=0, atol=1e-12)


def test_gated_rms_norm_groups_by_hand():
    gen = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 5, 12, generator=gen), torch.randn(2, 5, 12, generator=gen)
    w = torch.randn(12, generator=gen)
    eps = 1e-5
    xg = (x * z * torch.sigmoid(z)).view(2, 5, 3, 4)  # group_size 4: 3 groups
    ref = (xg / torch.sqrt((xg**2).mean(-1, keepdim=True) + eps)).view(2, 5, 12) * w
    torch.testing.assert_close(gated_rms_norm(x, z, w, eps, group_size=4), ref)
    whole = (x * F.silu(z)) / torch.sqrt(((x * F.silu(z)) ** 2).mean(-1, keepdim=True) + eps) * w
    torch.testing.assert_close(gated_rms_norm(x, z, w, eps), whole)
    before = x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * w * F.silu(z)
    torch.testing.assert_close(gated_rms_norm(x, z, w, eps, norm_before_gate=True), before)
    torch.testing.assert_close(
        gated_rms_norm(x, None, w, eps), x * torch.rsqrt((x**2).mean(-1, keepdim=True) + eps) * w
    )

    # bf16 in -> bf16 out, statistics in fp32: equals the fp32 computation on the same values, rounded once.
    xb, zb, wb = x.bfloat16() * 30, z.bfloat16(), w.bfloat16()
    out = gated_rms_norm(xb, zb, wb, eps, group_size=4)
    assert out.dtype == torch.bfloat16
    assert torch.equal(
        out, gated_rms_norm(xb.float(), zb.float(), wb.float(), eps, group_size=4).bfloat16()
    )


def test_chunked_scan_speed():
    """Reported, not asserted: forward+backward of the chunked scan at a small training shape."""
    torch.manual_seed(0)
    b, L, h, p, g, n = 2, 512, 8, 16, 1, 32
    inp = make_inputs(b=b, L=L, h=h, p=p, g=g, n=n, dtype=F32)
    leaves = {k: v.requires_grad_() for k, v in inp.items()}

    def step():
        ssd_chunk_scan(chunk_size=64, **leaves).sum().backward()

    step()
    times, cpu = [], []
    for _ in range(5):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    # Wall time swings with other jobs on shared cores; CPU time (all threads) is the steadier one.
    print(
        f"\nssd_chunk_scan fwd+bwd B={b} L={L} H={h} P={p} G={g} N={n} chunk 64 fp32: "
        f"wall min {min(times) * 1e3:.1f} ms, median {sorted(times)[2] * 1e3:.1f} ms; "
        f"CPU min {min(cpu) * 1e3:.1f} ms"
    )
    assert math.isfinite(min(times))
