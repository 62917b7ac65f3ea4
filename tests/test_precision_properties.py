"""Hypothesis properties of the NVFP4 quantizer: the error bound of the format, unbiased stochastic
rounding, and products preserved by the random Hadamard transform.

Examples are derandomized (the same inputs every run) and kept few, so the file runs in seconds.
"""

import math

import pytest
import torch
from hymoe.precision import nvfp4
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
EPS32 = 2.0**-24  # unit roundoff of float32


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machines: see test_nvfp4.py
    yield
    torch.set_num_threads(n)


@st.composite
def tensors(draw, max_rows=40, max_cols=72):
    """float32 [M, K] with a random overall magnitude and a random per-block spread of
    magnitudes (wide enough that some blocks get subnormal E4M3 scales or flush to zero)."""
    m = draw(st.integers(1, max_rows))
    k = draw(st.integers(1, max_cols))
    seed = draw(st.integers(0, 2**31 - 1))
    log_scale = draw(st.floats(-30, 30))
    spread = draw(st.sampled_from([0.0, 2.0, 8.0, 20.0]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    per_block = torch.exp(torch.randn(m, (k + 15) // 16, generator=g, dtype=torch.float64) * spread)
    x *= per_block.repeat_interleave(16, dim=1)[:, :k]
    x = (x * 2.0**log_scale).float()
    if draw(st.booleans()):
        x[torch.rand(m, k, generator=g) < 0.2] = 0.0  # zeros, and sometimes whole zero blocks
    return x


def _spacing(mag: torch.Tensor) -> torch.Tensor:
    """Distance between neighbouring E2M1 values around mag in [0, 6] (0.5, 1 or 2)."""
    return torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0)).double()


def _e4m3_half_ulp(s: torch.Tensor) -> torch.Tensor:
    """Half the E4M3 spacing at s >= 0: 2^(e-4) for normals (3 mantissa bits), 2^-10 below 2^-6."""
    e = torch.floor(torch.log2(s.clamp(min=2.0**-6)))
    return torch.where(s < 2.0**-6, 2.0**-10, 2.0 ** (e - 4))


def _block_view(t: torch.Tensor, two_d: bool) -> torch.Tensor:
    """[M, K] zero-padded -> one row per scale block: [num_blocks, 16] (1D) or [num_tiles, 256]."""
    t = torch.nn.functional.pad(t, (0, -t.shape[1] % 16, 0, (-t.shape[0] % 16) if two_d else 0))
    if two_d:
        mp, kp = t.shape
        return t.view(mp // 16, 16, kp // 16, 16).permute(0, 2, 1, 3).reshape(-1, 256)
    return t.view(-1, 16)


@SETTINGS
@given(x=tensors(), two_d=st.booleans(), bf16=st.booleans())
def test_dequantize_error_bounded_by_the_format(x, two_d, bf16):
    # The bound, per element x of a block with amax a, in exact arithmetic. With the global encode
    # scale S = 2688/amax(tensor), D = 1/S, the block scale is s = a·S/6 (<= 448), its E4M3 value
    # s8 = RNE(s), |s8 - s| <= half an E4M3 ulp at s (2^(e-4) <= s/16 for normals, 2^-10 for
    # subnormals), and the element is q = x/(s8·D) rounded to the E2M1 grid:
    #   |q| <= 6:  |x - x̂| <= (δ(|q|)/2)·s8·D   with δ the grid spacing: 0.5 below 2, 1 below 4, 2 up to 6;
    #   |q| >  6:  |x - x̂| = (|q| - 6)·s8·D <= 6·(s - s8)·D   (s8 rounded below s: clipped).
    # Both are covered by  δ(min(|q|, 6))/2 · s8·D + 6·max(0, s - s8)·D.  A flushed block (s8 = 0)
    # gives |x - x̂| = |x| <= a = 6·s·D. For a block whose scale is a normal E4M3 number
    # (s >= 2^-6) this is at most (17/16)·a/6 ≈ 0.18·a: checked separately below. Slack: the
    # float32 arithmetic (TE's order) adds a few ulps of a.
    if bf16:
        x = x.bfloat16()
    q = nvfp4.quantize(x, two_d=two_d)
    xd, xh = x.double(), q.dequantize().double()
    assert xh.shape == x.shape and xh.dtype == torch.float64

    amax = xd.abs().max()
    assert q.global_amax.item() == amax.item()
    if amax == 0:
        assert torch.equal(xh, torch.zeros_like(xh))
        return
    D = 1.0 / min(2688.0 / amax.item(), torch.finfo(torch.float32).max)
    blocks, err = _block_view(xd, two_d), _block_view((xd - xh).abs(), two_d)
    a = blocks.abs().amax(-1, keepdim=True)
    s = a / (6 * D)
    s8 = q.scale.double().reshape(-1, 1)
    assert ((s8 - s).abs() <= _e4m3_half_ulp(s) * (1 + 1e-5)).all(), "E4M3 scale rounding"
    qmag = blocks.abs() / (s8 * D)  # inf/nan where s8 = 0; those blocks are fully flushed
    flushed = (s8 == 0).expand_as(blocks)
    bound = _spacing(qmag.clamp(max=6)) / 2 * s8 * D + 6 * (s - s8).clamp(min=0) * D
    bound = torch.where(flushed, blocks.abs(), bound) + 8 * EPS32 * a
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    # The format's worst case for blocks with a normal E4M3 scale: (17/16)·a/6.
    normal = (s >= 2.0**-6).expand_as(blocks)
    assert (err[normal] <= ((17 / 16) * a / 6 + 8 * EPS32 * a).expand_as(blocks)[normal]).all()
    # Flushed blocks only occur where s underflows E4M3 (s < 2^-10, i.e. a < amax·2^-10/448).
    assert (s[s8 == 0] < 2.0**-10 * (1 + 1e-5)).all()


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    values=st.lists(st.floats(-6.5, 6.5, width=32), min_size=16, max_size=16),
    scale_exp=st.integers(-20, 20),
    seed=st.integers(0, 2**31 - 1),
)
def test_stochastic_rounding_unbiased_in_expectation(values, scale_exp, seed):
    # One 16-element block repeated on N rows: every row gets the same scales, so x̂ over the rows
    # are N independent stochastic roundings of the same q = x·m. In expectation x̂ equals
    # fl(x·m)·s8·D, i.e. x up to float32 rounding, except where |q| > 6 (clipped to ±6: no
    # randomness). Each draw is one of the two grid neighbours of q.
    n = 4096
    x = torch.tensor(values, dtype=torch.float32) * 2.0**scale_exp
    rows = x.repeat(n, 1)
    g = torch.Generator().manual_seed(seed)
    q = nvfp4.quantize(rows, stochastic=True, generator=g)
    draws = q.dequantize().double()  # [n, 16]
    if x.abs().max() == 0:
        assert torch.equal(draws, torch.zeros_like(draws))
        return
    unit = q.scale[0].double() * q.decode_scale.double()  # s8·D, one E2M1 step of 1 is `unit`
    qv = x.double() / unit
    lo = torch.floor(qv.abs() / _spacing(qv.abs().clamp(max=6))) * _spacing(qv.abs().clamp(max=6))
    clipped = qv.abs() > 6
    # Every draw is a neighbour: lo or lo + δ (in units of s8·D; x̂ itself carries one float32
    # rounding of value·s8·D).
    d_units = draws.abs() / unit
    hi = lo + _spacing(qv.abs().clamp(max=6))

    def close(a, b):
        return (a - b).abs() <= 2 * EPS32 * b

    neighbour = close(d_units, lo) | close(d_units, hi)
    assert neighbour[:, ~clipped].all()
    mean = draws.mean(0)
    want = torch.where(clipped, qv.sign() * 6 * unit, x.double())
    # Bernoulli between neighbours δ·unit apart: std of the mean <= δ·unit/(2·sqrt(n)); 5 sigma.
    tol = 5 * _spacing(qv.abs().clamp(max=6)) * unit / (2 * math.sqrt(n)) + 4 * EPS32 * x.abs()
    assert ((mean - want).abs() <= tol).all(), (mean - want).abs().max()
    # Round-to-nearest, by contrast, is biased wherever q is off the grid (a sanity check that the
    # tolerance above is tight enough to notice bias).
    rtn = nvfp4.quantize(rows[:1]).dequantize().double()[0]
    off_grid = (~clipped) & ((qv.abs() - lo) / _spacing(qv.abs().clamp(max=6)) > 0.2)
    off_grid &= (qv.abs() - lo) / _spacing(qv.abs().clamp(max=6)) < 0.8
    assert ((rtn - x.double()).abs()[off_grid] > tol[off_grid]).all()


@SETTINGS
@given(
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    groups=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-20, 20),
)
def test_rht_preserves_products_to_fp32_precision(m, n, groups, seed, log_scale):
    # T = diag(signs)·H16/4 is orthogonal, so (x·T)·(y·T)ᵀ = x·yᵀ exactly; in float32 the
    # transform rounds each element once after a 16-term sum and the product sums K terms. A
    # standard bound for the two float32 paths against exact arithmetic is
    # |fl(x'·y') - x·y| <= (K + 2·16)·u·|x|·|y| (Cauchy-Schwarz, u = 2^-24); checked per entry.
    k = 16 * groups
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 2.0**log_scale).float()
    y = (torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, 1, generator=g))).float()
    exact = x.double() @ y.double().t()
    via_rht = (nvfp4.rht_transform(x) @ nvfp4.rht_transform(y).t()).double()
    norms = x.double().norm(dim=1, keepdim=True) * y.double().norm(dim=1)[None, :]
    assert ((via_rht - exact).abs() <= (k + 32) * EPS32 * norms).all()
    # The transform itself is norm-preserving per 16-group (to float32 precision).
    xt = nvfp4.rht_transform(x).double().view(m, groups, 16).norm(dim=-1)
    torch.testing.assert_close(xt, x.double().view(m, groups, 16).norm(dim=-1), rtol=32 * EPS32, atol=0)
