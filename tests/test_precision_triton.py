"""hymoe's Triton kernels (precision/triton_kernels.py) give the eager path's bits, checked on CPU in
Triton's interpreter: NVFP4 codes, E4M3 scales, global amax and dequantized values (1D, 2D,
stochastic rounding with the same uniforms, RHT), MXFP8 data and E8M0 scales (floor and rceil),
fp32 and bf16 inputs, zeros, midpoints, extreme ranges, NaN/inf, odd and strided shapes. On a GPU
benchmarks/gpu_check.py repeats the comparison with the compiled kernels.

Triton reads TRITON_INTERPRET when a kernel is decorated, so the module fixture sets it and
(re)imports the kernel module; afterwards it reloads the module without it, leaving the compiled
kernels to later tests in the same process. Shapes stay small: the interpreter runs each program in
numpy, one after the other.
"""

import importlib

import pytest
import torch
from hymoe.precision import mxfp8, nvfp4
from precision_inputs import quantizer_inputs

# The interpreter evaluates 1/0 (an all-zero block's multiplier, capped afterwards) in numpy.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(scope="module")
def tk():
    try:
        import triton  # noqa: F401
    except (ImportError, RuntimeError) as e:  # RuntimeError: a triton without its toolchain
        pytest.skip(f"triton not importable: {e}")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    from hymoe.precision import triton_kernels

    module = importlib.reload(triton_kernels)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(n)
    mp.undo()
    importlib.reload(triton_kernels)


CASES = quantizer_inputs()


def _nvfp4_pair(tk, x, **kw):
    """(eager, triton) NVFP4Tensors and dequantized values, SR from the same seeded generator."""
    out = []
    for kernels in (None, tk):
        gen = torch.Generator().manual_seed(3) if kw.get("stochastic") else None
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(nvfp4, "triton_for", lambda t, k=kernels: k)
            q = nvfp4.quantize(x, generator=gen, **kw)
            out.append((q, q.dequantize()))
    return out


def _same_nvfp4(a, b):
    (qa, da), (qb, db) = a, b
    assert qa.data.shape == qb.data.shape and qa.scale.shape == qb.scale.shape
    assert qa.scale.dtype == qb.scale.dtype == torch.float8_e4m3fn
    assert torch.equal(qa.data, qb.data)
    assert torch.equal(qa.scale.view(torch.uint8), qb.scale.view(torch.uint8))
    assert torch.equal(qa.global_amax, qb.global_amax) or (
        qa.global_amax.isnan() and qb.global_amax.isnan()
    )
    assert da.dtype == db.dtype and da.shape == db.shape
    # Bit for bit, -0.0 and NaN included.
    assert torch.equal(da.view(torch.int32), db.view(torch.int32))


VARIANTS = {"1d": {}, "2d": {"two_d": True}, "sr": {"stochastic": True},
            "2d-sr": {"two_d": True, "stochastic": True}}


@pytest.mark.parametrize(
    ("name", "variant"),
    [(n, v) for n in sorted(CASES) for v in VARIANTS
     if CASES[n].dim() == 2 or not VARIANTS[v].get("two_d")],  # 2D tiles: 2-D tensors only
)
def test_nvfp4_triton_matches_eager(tk, name, variant):
    _same_nvfp4(*_nvfp4_pair(tk, CASES[name], **VARIANTS[variant]))


@pytest.mark.parametrize("name", ["normal", "bf16", "extreme", "zero"])
def test_nvfp4_triton_rht_matches_eager(tk, name):
    # The wgrad operands: RHT (torch, shared by both paths) then 1D blocks with SR.
    _same_nvfp4(*_nvfp4_pair(tk, CASES[name][:16, :32], rht=True, stochastic=True))


def test_nvfp4_triton_reads_strided_input(tk):
    # A transposed operand (xᵀ for wgrad) is read through its strides, without a copy.
    x = CASES["extreme"]
    xt = x.t()
    assert not xt.is_contiguous()
    for kw in ({}, {"two_d": True}, {"stochastic": True}):
        _same_nvfp4(*_nvfp4_pair(tk, xt, **kw))


def test_nvfp4_triton_amax_propagates_nan(tk):
    assert tk.amax(CASES["nan"]).isnan()
    assert tk.amax(CASES["inf"]) == float("inf")
    assert tk.amax(CASES["negzero"]) == 0
    assert torch.equal(tk.amax(CASES["bf16"]), CASES["bf16"].float().abs().amax())


@pytest.mark.parametrize("mode", mxfp8.SCALING_MODES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_mxfp8_triton_matches_eager(tk, name, mode):
    x = CASES[name]
    ref = mxfp8.quantize(x, scaling_mode=mode)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nvfp4, "triton_for", lambda t: tk)
        got = mxfp8.quantize(x, scaling_mode=mode)
    assert got.data.dtype == torch.float8_e4m3fn and got.data.shape == ref.data.shape
    assert torch.equal(got.data.view(torch.uint8), ref.data.view(torch.uint8))
    assert torch.equal(got.scale, ref.scale)


def test_e4m3_encoding_every_code(tk):
    # Every E4M3 value, the midpoints between neighbours (ties to even) and just either side of
    # them, both signs: the kernel's integer encoding against torch's cast.
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[vals.isfinite() & (vals >= 0)].sort().values
    mids = (vals[1:] + vals[:-1]) / 2
    near = torch.cat([mids, mids.nextafter(torch.zeros(())), mids.nextafter(vals[1:]), vals])
    x = torch.cat([near, -near, torch.tensor([1e-30, 2.0**-10, 2.0**-10 * 1.0001])])
    x = torch.nn.functional.pad(x, (0, -x.numel() % 31)).view(-1, 31)
    # 448 in every 32-element block: its rceil scale is 2^0, so the values are encoded as they are.
    x = torch.cat([x, torch.full((x.shape[0], 1), 448.0)], dim=1)
    ref = mxfp8.quantize(x, scaling_mode="rceil")
    data, scale = tk.mxfp8_quantize(x, "rceil")
    assert torch.equal(data.view(torch.uint8), ref.data.view(torch.uint8))
    assert torch.equal(scale, ref.scale)
    assert (scale == mxfp8.E8M0_BIAS).all()


def test_quantized_linear_triton_matches_eager(tk):
    # The emulated linear layer end to end (fprop, dgrad with SR, wgrad with RHT + SR), NVFP4 and
    # MXFP8: output and both gradients bit for bit.
    from hymoe.precision.emulated_linear import quantized_linear

    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(24, 32, generator=g)
    w0 = torch.randn(48, 32, generator=g) * 0.1
    dy = torch.randn(24, 48, generator=g)
    for fmt in ("nvfp4", "mxfp8"):
        results = []
        for kernels in (None, tk):
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            gen = torch.Generator().manual_seed(11)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(nvfp4, "triton_for", lambda t, k=kernels: k)
                y = quantized_linear(x, w, fmt, generator=gen)
                y.backward(dy)
            results.append((y.detach(), x.grad, w.grad))
        for a, b in zip(*results):
            assert torch.equal(a, b), fmt


def test_dispatch_switch():
    x = torch.ones(4, 16)
    assert nvfp4.triton_for(x) is None  # CPU tensors stay eager
    with pytest.raises(ValueError, match="HYMOE_TRITON"):
        nvfp4.set_triton("maybe")
    try:
        nvfp4.set_triton("off")
        if torch.cuda.is_available():
            assert nvfp4.triton_for(x.cuda()) is None
    finally:
        nvfp4.set_triton("auto")


_COMPILE_FOR_SM90 = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hymoe.precision import triton_kernels as tk

def ptx(fn, sig, consts):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    opts = {k: v for k, v in tk._LAUNCH.items()}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]

ints = lambda *names: {n: "i32" for n in names}
out = {
    "quantize": ptx(tk._nvfp4_quantize_kernel, {"x_ptr": "*bf16", "u_ptr": "*fp32",
        "amax_ptr": "*fp32", "data_ptr": "*u8", "scale_ptr": "*u8",
        **ints("R", "K", "RP", "KP", "stride_r", "stride_c")},
        {"TWO_D": True, "STOCHASTIC": True, "BLOCK_R": 16, "BLOCK_C": 128}),
    "dequantize": ptx(tk._nvfp4_dequantize_kernel, {"data_ptr": "*u8", "scale_ptr": "*u8",
        "amax_ptr": "*fp32", "out_ptr": "*fp32", **ints("R", "K", "KP")},
        {"TWO_D": False, "BLOCK_R": 32, "BLOCK_C": 128}),
    "mxfp8": ptx(tk._mxfp8_quantize_kernel, {"x_ptr": "*fp32", "data_ptr": "*u8",
        "scale_ptr": "*u8", **ints("R", "K", "KP", "stride_r", "stride_c")},
        {"RCEIL": True, "BLOCK_R": 32, "BLOCK_C": 128}),
    "amax": ptx(tk._amax_kernel, {"x_ptr": "*fp32", "partial_ptr": "*fp32",
        **ints("R", "K", "stride_r", "stride_c")}, {"BLOCK_R": 64, "BLOCK_C": 128}),
}
ops = ("div.rn.f32", "div.full", "div.approx", "fma.rn.f32", "mad.rn.f32", ".ftz", "max.NaN.f32",
       "max.f32")
json.dump({k: {o: v.count(o) for o in ops} for k, v in out.items()}, sys.stdout)
"""


def test_kernels_compile_for_hopper_with_ieee_arithmetic(tk):
    # Not the interpreter: the real compiler, down to sm_90 PTX and cubin (triton ships ptxas), in
    # a fresh process without TRITON_INTERPRET. What keeps the GPU bits equal to eager must be in
    # the PTX: IEEE divisions only, no FMA contraction, no flush-to-zero, NaN-propagating max.
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], capture_output=True, text=True,
                       env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    counts = json.loads(r.stdout)
    for name, c in counts.items():
        assert c["div.full"] == c["div.approx"] == 0, (name, c)
        assert c["fma.rn.f32"] == c["mad.rn.f32"] == c[".ftz"] == 0, (name, c)
        assert c["max.f32"] == 0, (name, c)  # NaN-dropping max
    assert counts["quantize"]["div.rn.f32"] > 0 and counts["mxfp8"]["div.rn.f32"] > 0
    assert counts["amax"]["max.NaN.f32"] > 0
