"""MXFP8 quantizer against torchao's `to_mx` (both shared-exponent rules) and the MXFP8 linear."""

import pytest
import torch
import torch.nn.functional as F
from hymoe.precision import mxfp8
from hymoe.precision.emulated_linear import MXFP8_SCALING_MODE, quantized_linear


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    # Shared 2-core CI machines: a second OpenMP thread makes small ops 10-100x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(256, 1024, generator=g)
    return {
        "normal": normal,
        "heavy": normal / torch.rand(256, 1024, generator=g).clamp(min=1e-4),
        "bf16": (torch.randn(256, 1024, generator=g) * 3).bfloat16(),
        # Beyond E4M3's range within a block: saturation (floor rule) and underflow.
        "wide": normal * torch.exp(torch.randn(256, 1024, generator=g) * 10),
        # Block maxima at the rounding edges of both rules: 448·2^k, 1.75·2^k, 2^k.
        "edges": torch.tensor([448.0, 1.75, 1.0, 448.0 * 2**-20, 7.0 * 2**30, 3.0])[:, None]
        * torch.linspace(-1, 1, 32)[None, :],
        "zero": torch.zeros(8, 64),
        "3d": normal.view(4, 64, 1024),
    }


@pytest.mark.parametrize("mode", ["floor", "rceil"])
@pytest.mark.parametrize("name", ["normal", "heavy", "bf16", "wide", "edges", "zero", "3d"])
def test_matches_torchao_to_mx(name, mode):
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    x = _inputs()[name]
    ao_mode = {"floor": mx.ScaleCalculationMode.FLOOR, "rceil": mx.ScaleCalculationMode.RCEIL}[mode]
    ao_scale, ao_data = mx.to_mx(x.contiguous(), torch.float8_e4m3fn, 32, scaling_mode=ao_mode)
    q = mxfp8.quantize(x, scaling_mode=mode)
    assert q.scale.dtype == torch.uint8 and q.data.dtype == torch.float8_e4m3fn
    assert torch.equal(q.scale, ao_scale.view(torch.uint8))
    assert torch.equal(q.data.view(torch.uint8), ao_data.view(torch.uint8))
    d = q.dequantize()
    assert d.shape == x.shape and not torch.isnan(d).any()


def test_rceil_tiny_blocks_follow_te():
    # Blocks whose scale exponent clamps to E8M0 0 (amax < ~2^-118): TE multiplies by 2^127 (the
    # reciprocal of 2^-127); torchao's RCEIL uses 1.0 there and returns zeros. We follow TE.
    x = torch.tensor([2.0**-125, 3e-39])[:, None] * torch.linspace(-1, 1, 32)[None, :]
    q = mxfp8.quantize(x, scaling_mode="rceil")
    assert q.scale.tolist() == [[0], [0]]
    assert torch.equal(
        q.data.float(), (x.double() * 2.0**127).float().to(torch.float8_e4m3fn).float()
    )
    torch.testing.assert_close(q.dequantize(), x, rtol=2**-4, atol=0)


def test_floor_is_floor_log2_amax_minus_8():
    x = torch.zeros(3, 32)
    x[:, 0] = torch.tensor([1.0, 1.99, 300.0])
    q = mxfp8.quantize(x)
    assert (q.scale.int() - 127).tolist() == [[-8], [-8], [0]]
    assert (mxfp8.quantize(x, scaling_mode="rceil").scale.int() - 127).tolist() == [[-8], [-7], [0]]


def test_dequantize_accuracy_and_padding():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(17, 70, generator=g)  # K not a multiple of 32
    q = mxfp8.quantize(x)
    assert q.data.shape == (17, 96) and q.scale.shape == (17, 3)
    d = q.dequantize(torch.bfloat16)
    assert d.shape == x.shape and d.dtype == torch.bfloat16
    # E4M3 keeps 3 mantissa bits: relative error <= 2^-4 above its smallest normal (2^-6·scale),
    # absolute <= 2^-10·scale below. The floor rule can also saturate a block's top values to 448
    # (amax up to 1.99·2^8 scale units); rceil never does, so check the bound there.
    qr = mxfp8.quantize(x, scaling_mode="rceil")
    scale = qr.scale_float().repeat_interleave(32, dim=-1)[:, :70]
    assert ((qr.dequantize() - x).abs() <= torch.maximum(x.abs() * 2**-4, scale * 2**-10)).all()
    assert (
        q.dequantize().abs() <= 448 * q.scale_float().repeat_interleave(32, dim=-1)[:, :70]
    ).all()
    padded = F.pad(x, (0, 26))
    assert torch.equal(mxfp8.quantize(padded).dequantize()[:, :70], q.dequantize())


def test_mxfp8_linear():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 20, 64, generator=g, requires_grad=True)  # 60 tokens: not a multiple of 32
    w = (torch.randn(48, 64, generator=g) / 8).requires_grad_()
    dy = torch.randn(3, 20, 48, generator=g)
    y = quantized_linear(x, w, "mxfp8")

    def deq(t):
        return mxfp8.quantize(t, scaling_mode=MXFP8_SCALING_MODE).dequantize()

    assert torch.equal(y, F.linear(deq(x.detach()), deq(w.detach())))
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x2, dy2 = x.detach().reshape(60, 64), dy.reshape(60, 48)
    # dgrad along N, wgrad along tokens, each operand quantized from the high-precision tensor.
    assert torch.equal(dx.reshape(60, 64), deq(dy2) @ deq(w.detach().t()).t())
    assert torch.equal(dw, deq(dy2.t()) @ deq(x2.t()).t())
    rx, rw = torch.autograd.grad(F.linear(x, w), (x, w), dy)
    for a, r in ((dx, rx), (dw, rw)):
        assert ((a - r).norm() / r.norm()).item() < 0.06
