"""Bit-for-bit against Transformer Engine's pure-PyTorch NVFP4 reference quantizer (optional).

TE ships `transformer_engine/pytorch/custom_recipes/reference_nvfp4.py` in its plain-Python wheel
(`pip download --no-deps transformer_engine==2.20.2`). The test reads that file straight from the
wheel in a cache directory, with TE's few base classes stubbed, and skips when the wheel is absent.
Nothing from TE is vendored; `import transformer_engine` is never attempted and sys.modules is left
as it was (other tests probe for a real TE).

Wheel location: $HYMOE_TE_WHEEL, else ~/.cache/hymoe/transformer_engine-2.20.2-py3-none-any.whl.
"""

import contextlib
import os
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from hymoe.precision import nvfp4

WHEEL = Path(
    os.environ.get("HYMOE_TE_WHEEL")
    or Path.home() / ".cache" / "hymoe" / "transformer_engine-2.20.2-py3-none-any.whl"
)
_PKG = "transformer_engine/pytorch/custom_recipes/"


@contextlib.contextmanager
def _stub_modules(names):
    saved = {n: sys.modules.get(n) for n in names}
    try:
        mods = {n: types.ModuleType(n) for n in names}
        sys.modules.update(mods)
        yield mods
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def _load_reference():
    with zipfile.ZipFile(WHEEL) as z:
        ref_src = z.read(_PKG + "reference_nvfp4.py").decode()
        utils_src = z.read(_PKG + "reference_utils.py").decode()
    cr = "transformer_engine.pytorch.custom_recipes"
    names = [
        "transformer_engine",
        "transformer_engine.pytorch",
        cr,
        cr + ".gemm",
        cr + ".reference_utils",
        "transformer_engine.pytorch.quantized_tensor",
    ]
    with _stub_modules(names) as mods:

        class Quantizer:  # the attributes the reference reads from TE's base class
            def __init__(self, rowwise=True, columnwise=True):
                self.rowwise_usage, self.columnwise_usage = rowwise, columnwise

        qt = mods["transformer_engine.pytorch.quantized_tensor"]
        qt.Quantizer, qt.QuantizedTensorStorage = Quantizer, type("QuantizedTensorStorage", (), {})
        gemm = mods[cr + ".gemm"]
        gemm.MMParams = object
        gemm.GEMMType = types.SimpleNamespace(FPROP="fprop", DGRAD="dgrad", WGRAD="wgrad")
        # Running TE's own reference source is the point of this test (read from the wheel).
        utils_code = compile(utils_src, "reference_utils.py", "exec")
        exec(utils_code, mods[cr + ".reference_utils"].__dict__)  # noqa: S102
        mods[cr].gemm, mods[cr].reference_utils = gemm, mods[cr + ".reference_utils"]
        ref = types.ModuleType("te_reference_nvfp4")
        exec(compile(ref_src, "reference_nvfp4.py", "exec"), ref.__dict__)  # noqa: S102
    return ref


@pytest.fixture(scope="module")
def ref():
    if not WHEEL.is_file():
        pytest.skip(
            f"TE wheel not found at {WHEEL} (pip download --no-deps transformer_engine==2.20.2)"
        )
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machines: see test_nvfp4.py
    yield _load_reference()
    torch.set_num_threads(n)


def _quantizer(ref, *, two_d=False, rht=False):
    return ref.NVFP4QuantizerRef(
        dtype=ref.reference_utils.Fp4Formats.E2M1,
        rowwise=True,
        columnwise=rht,
        quant_tile_shape=(16, 16) if two_d else (1, 16),
        with_rht=rht,
    )


def _cases():
    g = torch.Generator().manual_seed(0)
    n = torch.randn(256, 512, generator=g)
    return {
        "normal": n,
        "heavy": n / torch.rand(256, 512, generator=g).clamp(min=1e-6),
        "bf16": (n * 3).bfloat16(),
        "midpoints": torch.randint(-12, 13, (256, 512), generator=g) / 2.0 * 0.75,
        "extreme": n * torch.exp(torch.randn(256, 512, generator=g) * 8),
        "zero": torch.zeros(256, 512),
        "negzero": -torch.zeros(64, 64),
        "tiny": n[:64, :64] * 1e-40,
        "odd": torch.randn(100, 72, generator=g),
    }


@pytest.mark.parametrize("name", list(_cases()))
@pytest.mark.parametrize("two_d", [False, True], ids=["1d", "2d"])
def test_rowwise_bit_exact(ref, name, two_d):
    x = _cases()[name]
    m, k = x.shape
    te = _quantizer(ref, two_d=two_d).quantize(x)
    ours = nvfp4.quantize(x, two_d=two_d)
    # TE trims the packed data to [M, K/2] (we keep whole blocks and tiles) and repeats a 2D
    # tile's scale on its 16 rows.
    assert torch.equal(ours.data[:m, : k // 2], te.data)
    te_scale = te.scale[::16] if two_d else te.scale[:m]
    assert torch.equal(ours.scale.view(torch.uint8), te_scale.view(torch.uint8))
    assert torch.equal(ours.global_amax.view(1), te.global_amax_row)


@pytest.mark.parametrize("name", [n for n in _cases() if n != "odd"])
def test_columnwise_rht_bit_exact(ref, name):
    # TE's columnwise copy is quantize(rht(xᵀ)): 1D along the token dim, amax after the RHT.
    x = _cases()[name]
    te = _quantizer(ref, rht=True).quantize(x)
    ours = nvfp4.quantize(x.t(), rht=True)
    assert torch.equal(ours.data, te.data_t)
    assert torch.equal(ours.scale.view(torch.uint8), te.scale_t.view(torch.uint8))
    assert torch.equal(ours.global_amax.view(1), te.global_amax_col)


def test_gemm_of_dequantized_operands_matches_te_reference_gemm(ref):
    # TE's reference GEMM sums per-block products with scales and applies amax_x·amax_w/(6²·448²)
    # at the end; ours multiplies dequantized FP32 operands. Same math, different rounding order.
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(64, 128, generator=g), torch.randn(96, 128, generator=g)
    qx = _quantizer(ref).quantize(x)
    qw = _quantizer(ref, two_d=True).quantize(w)
    y_te = qx._quantizer.qgemm(
        qx.data, qw.data, None, torch.float32, qx.scale, qw.scale, qresult_x=qx, qresult_w=qw
    )
    y = nvfp4.quantize(x).dequantize() @ nvfp4.quantize(w, two_d=True).dequantize().t()
    torch.testing.assert_close(y, y_te, rtol=1e-5, atol=1e-5)
