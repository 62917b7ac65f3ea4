"""The compiled CPU kernels (torch.compile of nvfp4's quantizer) give the eager path's bits.

Each variant (1D, 2D, stochastic; quantize and dequantize) is one compiled graph, reused for every
case of its test; inductor's on-disk cache makes reruns faster.
"""

import pytest
import torch
from hymoe.precision import nvfp4

# Compiling costs seconds per kernel variant: ~15 s with inductor's cache warm, up to a minute
# cold on 2 busy cores.
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _single_thread_compiled():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    nvfp4.set_compile("auto")


def _cases():
    # Every case has >= 32 rows and columns: smaller tensors always run eagerly (nvfp4._kernel).
    g = torch.Generator().manual_seed(0)
    n = torch.randn(64, 96, generator=g)
    special = torch.full((32, 32), 0.5)
    special[3, 5] = float("nan")
    infs = torch.full((32, 32), 0.5)
    infs[7, 1] = float("inf")
    return {
        "normal": n,
        "heavy": n / torch.rand(64, 96, generator=g).clamp(min=1e-6),
        "bf16": (n * 3).bfloat16(),
        "midpoints": torch.randint(-12, 13, (64, 96), generator=g) / 2.0 * 0.75,
        "extreme": n * torch.exp(torch.randn(64, 96, generator=g) * 8),
        "zero": torch.zeros(32, 48),
        "negzero": -torch.zeros(32, 32),
        "tiny": n[:32, :32] * 1e-40,
        "odd": torch.randn(37, 50, generator=g),
        "3d": torch.randn(2, 16, 48, generator=g),
        "nan": special,
        "inf": infs,
    }


def _both(x, **kw):
    out = []
    for mode in ("off", "on"):
        nvfp4.set_compile(mode)
        gen = torch.Generator().manual_seed(3) if kw.get("stochastic") else None
        q = nvfp4.quantize(x, generator=gen, **kw)
        out.append((q, q.dequantize()))
    return out


def _same(a, b):
    (qa, da), (qb, db) = a, b
    assert torch.equal(qa.data, qb.data)
    # A NaN input makes every scale NaN; which NaN (sign bit) is not part of the contract.
    nan = qa.scale.float().isnan()
    assert torch.equal(nan, qb.scale.float().isnan())
    assert torch.equal(qa.scale.view(torch.uint8)[~nan], qb.scale.view(torch.uint8)[~nan])
    assert torch.equal(qa.global_amax, qb.global_amax) or (
        qa.global_amax.isnan() and qb.global_amax.isnan()
    )
    # equal_nan, and signs of zeros too (inductor compiles with -fno-signed-zeros).
    assert torch.equal(da.isnan(), db.isnan())
    assert torch.equal(da.nan_to_num(), db.nan_to_num())
    assert torch.equal(da.signbit()[~da.isnan()], db.signbit()[~db.isnan()])


@pytest.mark.parametrize(
    "kw",
    [{}, {"two_d": True}, {"stochastic": True}, {"rht": True, "stochastic": True}],
    ids=["1d", "2d", "sr", "rht-sr"],
)
def test_compiled_matches_eager_bit_for_bit(kw):
    for x in _cases().values():
        if kw.get("two_d") and x.dim() != 2:
            continue
        if kw.get("rht") and x.shape[-1] % 16:
            continue
        _same(*_both(x, **kw))


def test_auto_compiles_only_large_cpu_tensors():
    nvfp4.set_compile("auto")
    eager = nvfp4._quantize_blocks
    assert nvfp4._kernel("quantize_1d", torch.zeros(256, 16), False) is eager
    big = torch.zeros(nvfp4.COMPILE_MIN_NUMEL // 16, 16)
    assert nvfp4._kernel("quantize_1d", big, False) is not eager
    nvfp4.set_compile("on")
    assert nvfp4._kernel("quantize_1d", torch.zeros(64, 16), False) is not eager
    assert nvfp4._kernel("quantize_1d", torch.zeros(16, 16), False) is eager  # too few blocks
    nvfp4.set_compile("off")
    assert nvfp4._kernel("quantize_1d", big, False) is eager
    with pytest.raises(ValueError, match="compile mode"):
        nvfp4.set_compile("always")


def test_compile_failure_falls_back_to_eager(monkeypatch):
    nvfp4.set_compile("on")
    monkeypatch.setattr(nvfp4, "_compiled", {})

    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    x = torch.randn(32, 32)
    with pytest.warns(UserWarning, match="compile of quantize_1d failed"):
        q = nvfp4.quantize(x)
    nvfp4.set_compile("off")
    assert torch.equal(q.data, nvfp4.quantize(x).data)
