"""Quantization telemetry: the statistics on hand-made inputs, the step protocol, the roles each
quantized GEMM reports, accumulation over microbatches, and no work on unmeasured steps."""

import math

import pytest
import torch
from hymoe.precision import mxfp8, nvfp4, telemetry
from hymoe.precision.config import PrecisionConfig
from hymoe.precision.emulated_linear import NVFP4Recipe, quantized_linear
from hymoe.precision.telemetry import Telemetry, tensor_stats


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machines: see test_nvfp4.py
    yield
    torch.set_num_threads(n)


UNIT = 2688.0  # an element of this size makes the global scale S = 1 (see test_nvfp4.py)


def _stats(src, q):
    flushed, nonzero, saturated, numel, err_sq, ref_sq, amax = tensor_stats(src, q).tolist()
    return {
        "underflow": flushed / nonzero,
        "saturated": saturated / numel,
        "rel_error": math.sqrt(err_sq / ref_sq),
        "amax": amax,
    }


def test_stats_on_a_hand_made_block():
    # Row 0 fixes S = 1. Row 1's block has amax 6.3: its scale 1.05 rounds to s8 = 1.0, so the
    # multiplier is 1 and elements are rounded as they are: 6.3 and -6.2 clip (saturated), 0.2
    # and 0.1 flush to zero (underflow), 0.3 -> 0.5, 1.0 exact, the rest are zeros.
    x = torch.zeros(2, 16)
    x[0, 0] = UNIT
    x[1, :6] = torch.tensor([6.3, -6.2, 0.2, 0.1, 0.3, 1.0])
    q = nvfp4.quantize(x)
    assert q.scale[1, 0].float().item() == 1.0
    st = _stats(x, q)
    assert st["underflow"] == pytest.approx(2 / 7)  # 7 non-zeros, 0.2 and 0.1 flushed
    assert st["saturated"] == pytest.approx(2 / 32)  # 6.3 and -6.2 of 32 elements
    err = torch.tensor([0.3, 0.2, 0.2, 0.1, 0.2, 0.0])
    assert st["rel_error"] == pytest.approx((err.norm() / x.norm()).item(), rel=1e-5)
    assert st["amax"] == UNIT
    # An element exactly at 6 is representable: not saturated.
    y = torch.zeros(2, 16)
    y[0, 0], y[1, 0] = UNIT, 6.0
    assert _stats(y, nvfp4.quantize(y))["saturated"] == 0.0


def test_stats_in_the_rht_domain_and_for_2d_and_mxfp8():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 48, generator=g)
    # RHT: amax and error are those of rht(x), the tensor the quantizer actually saw.
    q = nvfp4.quantize(x, rht=True)
    st = _stats(x, q)
    assert st["amax"] == q.global_amax.item() == nvfp4.rht_transform(x).abs().max().item()
    xt = nvfp4.rht_transform(x)
    assert st["rel_error"] == pytest.approx(((xt - q.dequantize()).norm() / xt.norm()).item(), rel=1e-5)
    # 2D tiles: an unpadded [M, K] tensor against [Mp/16, Kp/16] tile scales.
    w = torch.randn(40, 50, generator=g)
    qw = nvfp4.quantize(w, two_d=True)
    st = _stats(w, qw)
    assert st["rel_error"] == pytest.approx(((w - qw.dequantize()).norm() / w.norm()).item(), rel=1e-5)
    # MXFP8 with torchao's floor rule saturates at 448; TE's rceil rule never does.
    heavy = torch.zeros(2, 32)
    heavy[:, 0] = 1.9 * 2**8  # amax in [2^8, 2^9): floor scale 2^0, 486 > 448 -> clipped
    heavy[:, 1] = 1.0
    assert _stats(heavy, mxfp8.quantize(heavy, scaling_mode="floor"))["saturated"] == 2 / 64
    assert _stats(heavy, mxfp8.quantize(heavy, scaling_mode="rceil"))["saturated"] == 0.0
    # A whole-tensor underflow: everything below the smallest E2M1 step of its block flushes.
    tiny = torch.full((1, 16), 1e-3)
    tiny[0, 0] = 1.0
    assert _stats(tiny, nvfp4.quantize(tiny))["underflow"] == pytest.approx(15 / 16)


RTN = NVFP4Recipe(disable_stochastic_rounding=True)


def _run(tel, recipe=RTN, fmt="nvfp4", calls=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(24, 40, generator=g) / 40**0.5).requires_grad_()
    for _ in range(calls):
        x = torch.randn(2, 13, 40, generator=g, requires_grad=True)
        y = quantized_linear(x, w, fmt, recipe, name="layers.0.mlp.linear_fc1", telemetry=tel)
        y.backward(torch.randn(y.shape, generator=g))  # seeded: no dependence on test order
    return x, w


def test_protocol_interval_roles_and_summary():
    tel = Telemetry(interval=2)
    assert not tel.start_step(1)
    _run(tel)
    assert tel.end_step() == []
    assert tel.start_step(2)
    _run(tel)
    rows = tel.end_step()
    roles = {(r["gemm"], r["tensor"]) for r in rows}
    # 2D weight tiles: dgrad reuses the fprop copy of W, so it has no row of its own.
    assert roles == {("fprop", "x"), ("fprop", "w"), ("dgrad", "dy"), ("wgrad", "dy"), ("wgrad", "x")}
    for r in rows:
        assert r["step"] == 2 and r["layer"] == "layers.0.mlp.linear_fc1" and r["format"] == "nvfp4"
        assert 0 <= r["underflow"] < 0.5 and 0 <= r["saturated"] < 0.05
        assert 0.02 < r["rel_error"] < 0.3 and r["amax"] > 0
    tel.start_step(3)
    _run(tel)
    assert tel.end_step() == []
    tel.start_step(4)
    _run(tel, seed=1)
    rows4 = tel.end_step()
    summary = tel.summary()
    assert len(summary) == 5 and all(s["steps"] == 2 for s in summary)
    fx = next(s for s in summary if (s["gemm"], s["tensor"]) == ("fprop", "x"))
    r2, r4 = (next(r for r in rs if (r["gemm"], r["tensor"]) == ("fprop", "x")) for rs in (rows, rows4))
    assert fx["rel_error_mean"] == pytest.approx((r2["rel_error"] + r4["rel_error"]) / 2)
    assert fx["amax_max"] == max(r2["amax"], r4["amax"])
    assert "layers.0.mlp.linear_fc1" in tel.format_summary()
    tel.reset()
    assert tel.summary() == [] and "no measured steps" in tel.format_summary()
    with pytest.raises(ValueError):
        Telemetry(interval=-1)
    cfg = PrecisionConfig(recipe="nvfp4", telemetry_interval=50, strict_zero_gradient=True)
    tel = Telemetry.from_config(cfg)
    assert tel.interval == 50 and tel.strict_zero_gradient


def test_1d_weights_and_mxfp8_report_the_dgrad_weight():
    for fmt, recipe in (("nvfp4", NVFP4Recipe(True, True, True)), ("mxfp8", NVFP4Recipe())):
        tel = Telemetry(interval=1)
        tel.start_step(1)
        _run(tel, recipe=recipe, fmt=fmt)
        rows = tel.end_step()
        assert len(rows) == 6 and ("dgrad", "w") in {(r["gemm"], r["tensor"]) for r in rows}
        assert {r["format"] for r in rows} == {fmt}


def test_microbatches_accumulate_by_element_counts():
    # Two calls in one measured step give one row per role, whose amax is the larger one and
    # whose fractions are pooled over both calls' elements.
    tel = Telemetry(interval=1)
    tel.start_step(1)
    seen = []
    real = telemetry.tensor_stats

    def spy(src, q):
        out = real(src, q)
        seen.append(out)
        return out

    telemetry.tensor_stats, saved = spy, telemetry.tensor_stats
    try:
        _run(tel, calls=2)
    finally:
        telemetry.tensor_stats = saved
    rows = tel.end_step()
    assert len(rows) == 5 and len(seen) == 10
    fx = next(r for r in rows if (r["gemm"], r["tensor"]) == ("fprop", "x"))
    a, b = seen[0], seen[5]  # the two fprop-x observations (5 per call, fprop x first)
    assert fx["amax"] == max(a[6].item(), b[6].item())
    assert fx["rel_error"] == pytest.approx(math.sqrt((a[4] + b[4]).item() / (a[5] + b[5]).item()))


def test_unmeasured_steps_compute_nothing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("tensor_stats called on an unmeasured step")

    monkeypatch.setattr(telemetry, "tensor_stats", boom)
    tel = Telemetry(interval=10)
    for step in range(1, 4):
        tel.start_step(step)
        _run(tel)
        assert tel.end_step() == []
    off = Telemetry(interval=0)  # measuring off; only the zero-gradient watch runs
    off.start_step(10)
    _run(off)
    assert off.end_step() == []
