"""NVFP4 quantizer: E2M1 rounding and packing, torchao as an independent oracle, padding, zeros,
the random Hadamard transform, stochastic rounding and its seeded generator."""

import pytest
import torch
from hymoe.precision import nvfp4
from hymoe.precision.rng import StochasticRoundingRNG


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    # On the shared 2-core CI machines a second OpenMP thread waits on a descheduled peer and small
    # ops take 10-100x longer; these tests are about numerics, so they run single-threaded.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# A first row with amax 448·6 makes the global scale S = 1 (D = 1); a block whose amax is 6 then
# gets s8 = fl(6·fl(1/6)) = 1.0, so its elements are rounded as they are: a direct view of E2M1.
UNIT = 2688.0


def _unit_scaled(values, rows=1):
    """[rows + 1, 32] float32: row 0 fixes S = 1; rows 1.. hold [6, values..., 0...] (one block)."""
    x = torch.zeros(rows + 1, 32)
    x[0, 0] = UNIT
    row = torch.zeros(16)
    row[0] = 6.0
    row[1 : 1 + len(values)] = torch.tensor(values)
    x[1:, :16] = row
    return x


def test_e2m1_rounding_table_and_signs():
    vals = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.1, 0.26, 4.9, -0.1, -0.25, -0.75, -5.0, -0.0]
    want = [0, 2, 2, 4, 4, 6, 6, 0, 1, 6, 8, 8, 10, 14, 0]  # code = sign·8 + index
    q = nvfp4.quantize(_unit_scaled(vals))
    assert q.global_amax.item() == UNIT and q.scale[1, 0].float().item() == 1.0
    codes = q.codes()[1, 1 : 1 + len(vals)]
    assert codes.tolist() == want
    # -0.0 gives code 0 (+0), a small negative code 8 (-0); both dequantize to zero.
    d = q.dequantize()[1, 1 : 1 + len(vals)]
    assert d[10].item() == 0.0 and torch.signbit(d[10]) and not torch.signbit(d[14])


def test_clamp_to_six():
    # Block amax 6.3: s = 1.05 rounds to s8 = 1.0 in E4M3, so x·m = 6.3 > 6 must clamp to code 7.
    x = torch.zeros(2, 16)
    x[0, 0], x[1, 0], x[1, 1] = UNIT, 6.3, -6.2
    q = nvfp4.quantize(x)
    assert q.scale[1, 0].float().item() == 1.0
    assert q.codes()[1, :2].tolist() == [7, 15]
    assert q.dequantize()[1, :2].tolist() == [6.0, -6.0]


def test_nibble_packing_order():
    codes = torch.arange(16, dtype=torch.uint8).repeat(2).view(2, 16)
    packed = nvfp4.pack_e2m1(codes)
    assert packed.shape == (2, 8)
    assert packed[0, 0].item() == 0 | (1 << 4) and packed[0, 3].item() == 6 | (7 << 4)
    assert torch.equal(nvfp4.unpack_e2m1(packed), codes)
    # Through quantize: elements 0 and 1 of a block (6 -> code 7, 0.5 -> code 1) share byte 0.
    q = nvfp4.quantize(_unit_scaled([0.5]))
    assert q.data[1, 0].item() == 7 | (1 << 4)


def _torchao_nvfp4(x):
    ao = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")
    amax = x.abs().amax().float()
    pts = ao.per_tensor_amax_to_scale(amax)
    scale, packed = ao.nvfp4_quantize(x.contiguous(), 16, pts)
    scale = scale.view(*x.shape[:-1], -1)  # torchao flattens leading dims after the first
    codes = kernels.unpack_uint4(packed)
    vals = (
        kernels.f4_unpacked_to_f32(codes).unflatten(-1, (-1, 16)) * (pts * scale.float())[..., None]
    )
    return scale, codes, vals.flatten(-2)


def _inputs():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(512, 1024, generator=g)
    # Heavy tails within E4M3's block-scale range (torchao clamps tiny block scales up to 2^-9
    # where TE flushes them to zero; that regime is covered by the TE-reference test instead).
    heavy = normal / torch.rand(512, 1024, generator=g).clamp(min=1e-3).sqrt()
    bf16 = (torch.randn(512, 1024, generator=g) * 3).bfloat16()
    return {"normal": normal, "heavy": heavy, "bf16": bf16, "3d": normal.view(4, 128, 1024)}


@pytest.mark.parametrize("name", ["normal", "heavy", "bf16", "3d"])
def test_matches_torchao(name):
    x = _inputs()[name]
    ao_scale, ao_codes, ao_vals = _torchao_nvfp4(x)
    q = nvfp4.quantize(x)
    assert torch.equal(q.scale.view(torch.uint8), ao_scale.view(torch.uint8))
    # torchao forms the element multiplier as (1/(amax/2688))/s8, TE (and we) as 1/(s8·(1/S)):
    # the two can differ by an ulp, which moves an element across an exact rounding midpoint.
    # Those are the only differences allowed, and each must sit on a midpoint. With float32 inputs
    # they are rare (<= 1e-4; none on these tensors). bf16 inputs carry 8 significant bits, so
    # x·m lands exactly on a midpoint far more often (measured 0-0.17% over seeds): limit 5e-3.
    diff = q.codes() != ao_codes
    limit = 5e-3 if x.dtype == torch.bfloat16 else 1e-4
    assert diff.float().mean().item() <= limit
    if diff.any():
        xd = x.double().unflatten(-1, (-1, 16))
        s8 = q.scale.double().unsqueeze(-1)
        scaled = (xd / (s8 * (q.global_amax.double() / UNIT))).flatten(-2)[diff].abs()
        mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float64)
        assert ((scaled[:, None] - mids).abs().min(1).values <= 1e-6 * scaled).all()
    # Dequantized values: torchao scales by (amax/2688)·s8, we by s8·(1/(2688/amax)); the two
    # roundings differ by at most 2 ulp.
    same = ~diff
    torch.testing.assert_close(q.dequantize()[same], ao_vals[same], rtol=2.0**-22, atol=0)


def test_zero_tensor_and_zero_blocks():
    for kw in ({}, {"two_d": True}, {"rht": True}, {"stochastic": True}):
        q = nvfp4.quantize(torch.zeros(32, 48), **kw)
        d = q.dequantize()
        assert not torch.isnan(d).any() and torch.equal(d, torch.zeros(32, 48))
        assert q.global_amax.item() == 0.0
    x = torch.randn(4, 64)
    x[:, 16:32] = 0
    d = nvfp4.quantize(x).dequantize()
    assert torch.equal(d[:, 16:32], torch.zeros(4, 16)) and not torch.isnan(d).any()


@pytest.mark.parametrize("two_d", [False, True])
def test_k_not_multiple_of_16_padding_never_leaks(two_d):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 50, generator=g)
    q = nvfp4.quantize(x, two_d=two_d)
    assert q.dequantize().shape == x.shape
    assert q.scale.shape == ((3, 4) if two_d else (37, 4))
    # Explicit zero padding gives the same codes and scales: padding adds no amax.
    padded = torch.nn.functional.pad(x, (0, 14, 0, 11 if two_d else 0))
    qp = nvfp4.quantize(padded, two_d=two_d)
    assert torch.equal(q.data, qp.data) and torch.equal(
        q.scale.view(torch.uint8), qp.scale.view(torch.uint8)
    )
    assert torch.equal(q.dequantize(), qp.dequantize()[: x.shape[0], : x.shape[1]])
    assert (q.dequantize() - x).abs().max() < 0.5 * x.abs().max()


def test_2d_tiles_share_one_scale_and_transpose_consistently():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 96, generator=g)
    q = nvfp4.quantize(w, two_d=True)
    assert q.scale.shape == (4, 6) and q.scale.dtype == torch.float8_e4m3fn
    # Wᵀ quantized in 16×16 tiles has exactly the transposed values (the fprop/dgrad property).
    assert torch.equal(nvfp4.quantize(w.t(), two_d=True).dequantize(), q.dequantize().t())
    with pytest.raises(ValueError):
        nvfp4.quantize(w.view(2, 32, 96), two_d=True)


def test_rht_matrix_orthogonal_with_te_signs():
    t = nvfp4.rht_matrix()
    assert torch.equal(t @ t.t(), torch.eye(16))
    # Rows are the Sylvester rows times TE's fixed signs (row 0 of Sylvester is all ones).
    assert t[:, 0].mul(4).tolist() == list(map(float, nvfp4.RHT_SIGNS))
    assert torch.equal(t.abs(), torch.full((16, 16), 0.25))


def test_rht_preserves_inner_products_along_transformed_dim():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 64, generator=g, dtype=torch.float64)
    y = torch.randn(40, 64, generator=g, dtype=torch.float64)
    torch.testing.assert_close(nvfp4.rht_transform(x) @ nvfp4.rht_transform(y).t(), x @ y.t())
    with pytest.raises(ValueError):
        nvfp4.rht_transform(torch.zeros(4, 40))


def test_rht_quantize_is_quantize_of_transformed():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 128, generator=g)
    x[3, 7] = 40.0  # an outlier the transform spreads over its 16-group
    q = nvfp4.quantize(x, rht=True)
    qt = nvfp4.quantize(nvfp4.rht_transform(x))
    assert q.rht and torch.equal(q.data, qt.data) and torch.equal(q.global_amax, qt.global_amax)
    # dequantize stays in the transformed domain (documented): close to rht(x), not to x.
    err_t = (q.dequantize() - nvfp4.rht_transform(x)).norm() / x.norm()
    assert err_t < 0.15 and (q.dequantize() - x).norm() / x.norm() > 0.5


def test_stochastic_rounding_unbiased():
    vals = [0.3, 2.2, 4.5, -1.3, 5.9, 0.1, 3.0]  # 3.0 is on the grid: must never move
    x = _unit_scaled(vals, rows=20000)
    g = torch.Generator().manual_seed(5)
    d = nvfp4.quantize(x, stochastic=True, generator=g).dequantize()[1:, 1 : 1 + len(vals)]
    mean = d.mean(0)
    # Bernoulli between neighbours (gap <= 2): std of the mean <= 1/sqrt(20000) ~ 0.007.
    torch.testing.assert_close(mean, torch.tensor(vals), atol=0.03, rtol=0)
    assert torch.equal(d[:, 6], torch.full((20000,), 3.0))
    # Every draw is one of the two neighbours: 0.3 -> {0, 0.5}, 2.2 -> {2, 3}, 4.5 -> {4, 6}.
    assert set(d[:, 0].unique().tolist()) == {0.0, 0.5} and set(d[:, 2].unique().tolist()) == {
        4.0,
        6.0,
    }
    # With the default generator too (None): still runs, still unbiased.
    d2 = nvfp4.quantize(x, stochastic=True).dequantize()[1:, 1 : 1 + len(vals)]
    torch.testing.assert_close(d2.mean(0), torch.tensor(vals), atol=0.03, rtol=0)


def test_stochastic_rounding_reproducible_from_seed():
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(6))
    a = nvfp4.quantize(x, stochastic=True, generator=torch.Generator().manual_seed(7)).data
    b = nvfp4.quantize(x, stochastic=True, generator=torch.Generator().manual_seed(7)).data
    c = nvfp4.quantize(x, stochastic=True, generator=torch.Generator().manual_seed(8)).data
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_rng_state_save_restore_repeats_draws():
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(9))
    rng = StochasticRoundingRNG(seed=1234, rank=0)
    state = rng.state_dict()
    first = nvfp4.quantize(x, stochastic=True, generator=rng.generator).data
    second = nvfp4.quantize(x, stochastic=True, generator=rng.generator).data
    assert not torch.equal(first, second)
    # A resumed process: fresh holder, state loaded -> the same draws again.
    resumed = StochasticRoundingRNG(seed=1234, rank=0)
    resumed.load_state_dict(state)
    assert torch.equal(nvfp4.quantize(x, stochastic=True, generator=resumed.generator).data, first)
    rng.load_state_dict(state)
    assert torch.equal(nvfp4.quantize(x, stochastic=True, generator=rng.generator).data, first)
    # Same (seed, rank) -> same stream; another rank -> another stream; a mismatch is an error.
    assert torch.equal(StochasticRoundingRNG(1234, 0).generator.get_state(), state["state"])
    other = StochasticRoundingRNG(seed=1234, rank=1)
    assert not torch.equal(
        nvfp4.quantize(x, stochastic=True, generator=other.generator).data, first
    )
    with pytest.raises(ValueError, match="rank"):
        other.load_state_dict(state)
