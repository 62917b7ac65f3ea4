"""Emulated quantized linear: the contract's operand table wired into fprop, dgrad and wgrad."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hymoe.precision import nvfp4
from hymoe.precision.emulated_linear import NVFP4Recipe, quantized_linear
from hymoe.precision.rng import StochasticRoundingRNG
from hymoe.precision.telemetry import QuantizationWarning, Telemetry


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    # On the shared 2-core CI machines a second OpenMP thread waits on a descheduled peer and small
    # ops take 10-100x longer; these tests are about numerics, so they run single-threaded.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


NO_SR_RHT = NVFP4Recipe(disable_rht=True, disable_stochastic_rounding=True)


def _data(t=96, k=64, n=48, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).requires_grad_()
    dy = torch.randn(t, n, generator=g).to(dtype)
    return x, w, dy


def _grads(y, x, w, dy):
    return torch.autograd.grad(y, (x, w), dy)


def _deq(t, **kw):
    return nvfp4.quantize(t, **kw).dequantize()


@pytest.mark.parametrize("fmt", ["bf16", "fp32", "none"])
def test_unquantized_formats_are_f_linear(fmt):
    x, w, dy = _data()
    b = torch.randn(w.shape[0])
    y = quantized_linear(x, w, fmt, bias=b)
    ref = F.linear(x, w, b)
    assert torch.equal(y, ref)
    for a, r in zip(_grads(y, x, w, dy), _grads(ref, x, w, dy)):
        assert torch.equal(a, r)


def test_forward_is_linear_of_dequantized_operands():
    x, w, _ = _data()
    y = quantized_linear(x, w, "nvfp4", NO_SR_RHT)
    assert torch.equal(y, F.linear(_deq(x), _deq(w, two_d=True)))
    # With 2D disabled the weight is 1D along K, like x.
    y1 = quantized_linear(x, w, "nvfp4", NVFP4Recipe(True, True, True))
    assert torch.equal(y1, F.linear(_deq(x), _deq(w)))


def test_backward_operands_follow_the_contract_table():
    x, w, dy = _data()
    dx, dw = _grads(quantized_linear(x, w, "nvfp4", NO_SR_RHT), x, w, dy)
    # dgrad: dy 1D along N times the same 2D-quantized W; wgrad: dyᵀ and xᵀ 1D along tokens.
    assert torch.equal(dx, _deq(dy) @ _deq(w.detach(), two_d=True))
    assert torch.equal(dw, _deq(dy.t()) @ _deq(x.detach().t()).t())
    # 2D disabled: dgrad uses the columnwise copy Wᵀ, 1D along N.
    dx1, _ = _grads(quantized_linear(x, w, "nvfp4", NVFP4Recipe(True, True, True)), x, w, dy)
    assert torch.equal(dx1, _deq(dy) @ _deq(w.detach().t()).t())
    # RHT on (SR off): both wgrad operands are transformed along tokens; dgrad is unchanged.
    rht = NVFP4Recipe(disable_stochastic_rounding=True)
    dx2, dw2 = _grads(quantized_linear(x, w, "nvfp4", rht), x, w, dy)
    assert torch.equal(dx2, dx)
    want = _deq(dy.t(), rht=True) @ _deq(x.detach().t(), rht=True).t()
    assert torch.equal(dw2, want)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("recipe", [NVFP4Recipe(), NO_SR_RHT], ids=["default", "rtn"])
def test_gradients_shapes_finite_close(recipe):
    # 3-D input, 2·13 = 26 tokens (not a multiple of 16), K and N not multiples of 16.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 13, 40, generator=g, requires_grad=True)
    w = (torch.randn(24, 40, generator=g) / 40**0.5).requires_grad_()
    dy = torch.randn(2, 13, 24, generator=g)
    y = quantized_linear(x, w, "nvfp4", recipe, torch.Generator().manual_seed(2))
    ref = F.linear(x, w)
    assert y.shape == ref.shape and y.dtype == x.dtype
    dx, dw = _grads(y, x, w, dy)
    rx, rw = _grads(ref, x, w, dy)
    assert dx.shape == x.shape and dw.shape == w.shape
    for a, r in ((y, ref), (dx, rx), (dw, rw)):
        assert torch.isfinite(a).all() and a.abs().amax() > 0
        # FP4 (8 magnitudes) gives ~10-15% relative error per GEMM on Gaussian data; SR adds noise.
        assert _rel(a, r) < 0.25


def test_bf16_activations_keep_their_dtype():
    x, w, dy = _data(t=32, k=32, n=16, dtype=torch.bfloat16)
    y = quantized_linear(x, w, "nvfp4", NVFP4Recipe(), torch.Generator().manual_seed(0))
    dx, dw = _grads(y, x, w, dy)
    assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16
    assert _rel(y, F.linear(x.float(), w.float())) < 0.25


def test_same_generator_seed_same_gradients_and_zero_grad_is_zero():
    x, w, dy = _data()
    runs = [
        _grads(
            quantized_linear(x, w, "nvfp4", NVFP4Recipe(), torch.Generator().manual_seed(s)),
            x,
            w,
            dy,
        )
        for s in (3, 3, 4)
    ]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0], runs[2][0]) and not torch.equal(runs[0][1], runs[2][1])
    # An all-zero upstream gradient is legitimately zero (not NaN, not the all-zero-bug check).
    dx, dw = _grads(quantized_linear(x, w, "nvfp4"), x, w, torch.zeros_like(dy))
    assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dw, torch.zeros_like(dw))


def test_stochastic_rounding_backward_is_unbiased():
    x, w, dy = _data(t=64, k=64, n=64, seed=5)
    # Expectation over SR of the dgrad is dy (unquantized) times the quantized W; of the wgrad,
    # dyᵀ·x̂ in the RHT domain, i.e. rht(dyᵀ)·rht(x̂ᵀ)ᵀ with dy unquantized.
    exact_dx = dy @ _deq(w.detach(), two_d=True)
    exact_dw = nvfp4.rht_transform(dy.t()) @ _deq(x.detach().t(), rht=True).t()
    rtn_dx, rtn_dw = _grads(
        quantized_linear(x, w, "nvfp4", NVFP4Recipe(disable_stochastic_rounding=True)), x, w, dy
    )
    n = 128
    gen = torch.Generator().manual_seed(6)
    sum_dx, sum_dw = torch.zeros_like(exact_dx), torch.zeros_like(exact_dw)
    for _ in range(n):
        dx, dw = _grads(quantized_linear(x, w, "nvfp4", NVFP4Recipe(), gen), x, w, dy)
        sum_dx += dx
        sum_dw += dw
    # RTN is biased by ~10%; the SR mean over 128 draws must be several times closer (noise of one
    # draw ~15%, /sqrt(128) ~ 1.3%).
    for sr_mean, rtn, exact in ((sum_dx / n, rtn_dx, exact_dx), (sum_dw / n, rtn_dw, exact_dw)):
        assert _rel(sr_mean, exact) < 0.03 and _rel(rtn, exact) > 0.05


def test_rejects_unknown_format():
    x, w, _ = _data()
    with pytest.raises(ValueError, match="fmt"):
        quantized_linear(x, w, "fp8")


def test_gradient_quantized_to_all_zeros_is_detected(monkeypatch):
    # The SR bug of one TE release: non-zero gradients whose codes all came out zero.
    x, w, dy = _data()
    y = quantized_linear(x, w, "nvfp4")
    monkeypatch.setattr(nvfp4, "_round_e2m1", lambda q, u: torch.zeros_like(q, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="all zeros"):
        _grads(y, x, w, dy)


def test_zeroed_gradient_with_telemetry_warns_naming_the_layer(monkeypatch):
    # With a Telemetry attached the check is deferred to end_step (one host sync per step) and
    # names the layer; strict_zero_gradient turns the warning back into an error.
    x, w, dy = _data()
    for strict in (False, True):
        tel = Telemetry(strict_zero_gradient=strict)
        tel.start_step(1)
        y = quantized_linear(x, w, "nvfp4", name="decoder.layers.3.mlp.linear_fc2", telemetry=tel)
        with monkeypatch.context() as m:
            m.setattr(nvfp4, "_round_e2m1", lambda q, u: torch.zeros_like(q, dtype=torch.uint8))
            _grads(y, x, w, dy)  # no error here: nothing synchronises inside backward
        if strict:
            with pytest.raises(RuntimeError, match=r"decoder\.layers\.3\.mlp\.linear_fc2"):
                tel.end_step()
        else:
            with pytest.warns(QuantizationWarning, match=r"layers\.3\.mlp\.linear_fc2 \(dgrad dy\)"):
                tel.end_step()
    # A healthy step reports nothing, and a legitimately zero upstream gradient is not flagged.
    tel = Telemetry()
    tel.start_step(2)
    y = quantized_linear(x, w, "nvfp4", name="ok", telemetry=tel)
    _grads(y, x, w, torch.zeros_like(dy))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tel.end_step() == []


def test_resumed_rng_repeats_gradients():
    x, w, dy = _data()
    rng = StochasticRoundingRNG(seed=11, rank=3)
    state = rng.state_dict()
    first = _grads(quantized_linear(x, w, "nvfp4", NVFP4Recipe(), rng.generator), x, w, dy)
    resumed = StochasticRoundingRNG(seed=11, rank=3)
    resumed.load_state_dict(state)
    again = _grads(quantized_linear(x, w, "nvfp4", NVFP4Recipe(), resumed.generator), x, w, dy)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8"])
def test_an_expert_with_no_tokens(fmt):
    # MoE routing can leave an expert without tokens: x [0, K] must give y [0, N], dx [0, K] and a
    # zero dW (not NaN, not an error), with and without telemetry.
    w = torch.randn(24, 40).requires_grad_()
    x = torch.zeros(0, 40, requires_grad=True)
    tel = Telemetry(interval=1)
    tel.start_step(1)
    y = quantized_linear(x, w, fmt, NVFP4Recipe(), torch.Generator().manual_seed(0),
                         name="experts.7", telemetry=tel)
    assert y.shape == (0, 24)
    dx, dw = _grads(y, x, w, torch.zeros(0, 24))
    assert dx.shape == (0, 40) and torch.equal(dw, torch.zeros_like(w))
    rows = tel.end_step()
    empty = [r for r in rows if r["tensor"] != "w"]  # the token operands: nothing to measure
    assert empty and all(r["underflow"] == r["rel_error"] == r["amax"] == 0.0 for r in empty)
    assert all(math.isfinite(v) for r in rows for v in (r["rel_error"], r["amax"]))


def _ranges(dtype=torch.float32):
    """Inputs whose blocks span the format: ordinary, huge, tiny (E4M3 scales near underflow),
    mixed magnitudes in one tensor, and zeros."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 96, generator=g)
    mixed = base * torch.logspace(-12, 12, 96).unsqueeze(0)
    return [t.to(dtype) for t in (base, base * 1e30, base * 1e-30, mixed, torch.zeros(64, 96))]


@pytest.mark.parametrize("two_d", [False, True])
def test_block_values_are_exact_in_16_bits_and_times_d_give_the_dequantized_values(two_d):
    # What lets CUDA run the NVFP4 GEMMs on BF16 tensor cores: code x E4M3 scale has <= 6
    # significant bits, and the global decode scale D is applied to the FP32 output instead.
    for x in _ranges():
        q = nvfp4.quantize(x, two_d=two_d)
        v = q.block_values()
        for dtype in (torch.bfloat16, torch.float16):
            assert torch.equal(q.block_values(dtype).float(), v)
        assert torch.equal(v * q.decode_scale, q.dequantize())


def test_any_nonzero_is_whether_the_dequantized_tensor_has_a_non_zero():
    from hymoe.precision import mxfp8

    cases = _ranges()
    # One block far below the rest: its E4M3 scale underflows to zero while its codes do not.
    lone = torch.zeros(16, 64)
    lone[0, :16] = 1e-30
    lone[1, 0] = 1e8
    for x in [*cases, lone, torch.zeros(0, 32)]:
        for q in (nvfp4.quantize(x), nvfp4.quantize(x, two_d=True), mxfp8.quantize(x)):
            deq = q.dequantize()
            want = bool(deq.numel()) and bool((deq != 0).any())
            assert bool(q.any_nonzero()) == want


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8"])
def test_tensor_core_gemm_equals_the_fp32_reference_to_rounding(fmt):
    # The CUDA path factors D out of NVFP4 operands; on CPU the same factored product runs with
    # FP32 operands (the BF16 cast is exact, tested above). Every layout the linear layer uses.
    from hymoe.precision import mxfp8
    from hymoe.precision.emulated_linear import gemm

    def quant(t, **kw):
        return nvfp4.quantize(t, **kw) if fmt == "nvfp4" else mxfp8.quantize(t)

    g = torch.Generator().manual_seed(5)
    x, w, dy = (torch.randn(*shape, generator=g) for shape in ((80, 64), (48, 64), (80, 48)))
    w_fprop = quant(w, two_d=True) if fmt == "nvfp4" else quant(w)
    for scale in (1.0, 1e-20, 1e20):
        pairs = [(quant(x * scale), w_fprop, {"tb": True}),
                 (quant(dy * scale), quant(w.t()), {"tb": True}),
                 (quant(dy.t() * scale), quant(x.t()), {"tb": True}),
                 (quant(x.t() * scale), quant(dy.t()), {"ta": False, "tb": True})]
        for a, b, kw in pairs:
            ref = gemm(a, b, tensor_cores=False, **kw)
            fast = gemm(a, b, tensor_cores=True, **kw)
            assert fast.dtype == ref.dtype == torch.float32
            rel = ((fast - ref).abs().max() / ref.abs().max()).item()
            assert rel < 1e-6, (scale, rel)
