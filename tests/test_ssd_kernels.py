"""The CUDA fast path of the Mamba-2 kernels (hymoe/model/ssd_kernels.py) gives hymoe's results.

mamba-ssm's Triton SSD scan runs on CPU tensors in Triton's interpreter, called through ssd_kernels'
dispatch wrapper, against hymoe's own scan in fp32: outputs, final states and every input gradient,
on cases that exercise the argument mapping (layouts, dt_bias/softplus/dt_limit, D per head and per
channel, seq_idx, initial states with documents not numbered from 0, z). That comparison is
benchmarks/ssd_kernels_check.py, which on a GPU (`make gpu-check`) repeats it with the compiled
kernels in fp32 and bf16 and times both; here it runs as `--device cpu` in a child process, because
TRITON_INTERPRET must be set before triton is first imported (triton.language's own @jit helpers,
e.g. tl.cumsum's, are decorated then). causal-conv1d's kernel needs its compiled CUDA extension, so
only its layout mapping is checked, with a stand-in that asserts what the kernel requires.

mamba-ssm comes from `make install` (its Python sources only; Makefile `oracles`); without it, or
without triton, the interpreted comparison skips.
"""

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from hymoe.model import ssd, ssd_kernels

ROOT = Path(__file__).resolve().parents[1]


def _needs_triton_and_mamba_ssm():
    try:
        import triton  # noqa: F401
    except (ImportError, RuntimeError) as e:  # RuntimeError: a triton without its toolchain
        pytest.skip(f"triton not importable: {e}")
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba-ssm not installed (Makefile `oracles` installs its Python sources)")


def test_interpreted_mamba_scan_matches_hymoe(tmp_path):
    _needs_triton_and_mamba_ssm()
    out = tmp_path / "ssd_kernels_check.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ssd_kernels_check.py"), "--device", "cpu",
         "--json", str(out)],
        check=False, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert "mamba-ssm Triton" in res["kernels"], res["kernels"]
    assert set(res["mapping"]) == {"documents, dt clamp", "states, gate, D[H,P]"}
    for case, c in res["mapping"].items():
        assert {"y", "dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias"} <= set(c["max_rel"]), case
        for name, rel in c["max_rel"].items():
            assert rel <= 1e-5, f"{case}: {name} differs by {rel:.2e} of its largest value"
    assert {"final_state", "dz", "dinitial_states"} <= set(res["mapping"]["states, gate, D[H,P]"]
                                                            ["max_rel"])
    assert isinstance(res["timing"], dict), res["timing"]  # the GPU check's timing code runs
    assert r.returncode == 0 and res["ok"], r.stdout[-3000:] + r.stderr[-3000:]


def test_loaded_without_leaving_package_stub():
    _needs_triton_and_mamba_ssm()
    before = {m for m in sys.modules if m.split(".")[0] == "mamba_ssm"}
    try:
        k = ssd_kernels.load_kernels()
        assert k.scan is not None, k.scan_reason
        assert "mamba-ssm Triton" in k.describe()
        # Without selective_scan_cuda `import mamba_ssm` fails; the unexecuted package object
        # that stood in for it during the import must be gone (a full install leaves the real one).
        pkg = sys.modules.get("mamba_ssm")
        assert pkg is None or hasattr(pkg, "Mamba2")
    finally:
        for m in [m for m in sys.modules if m.split(".")[0] == "mamba_ssm"]:
            if m not in before:
                del sys.modules[m]


def test_conv_layout_mapping(monkeypatch):
    """causal_conv1d_fn's contract (x [B, D, L] channels-last in memory, int32 seq_idx, weight
    [D, W]) is met and its output is mapped back to [B, L, D]."""
    seen = {}

    def conv_stand_in(x, weight, bias, seq_idx=None, activation=None):
        seen.update(layout=(tuple(x.shape), x.stride(1)), seq_dtype=seq_idx.dtype)
        out = ssd.causal_conv1d(x.transpose(1, 2), weight, bias, seq_idx, activation)
        return out.transpose(1, 2).contiguous()  # the kernel returns its own [B, D, L]

    k = ssd_kernels.Kernels(None, conv_stand_in, "test", "")
    monkeypatch.setattr(ssd_kernels, "_kernels_for", lambda t: k)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(11, 3, 6, generator=g).transpose(0, 1)  # [B, L, D], not contiguous
    w, bias = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    seq_idx = torch.tensor([[0] * 5 + [1] * 6, [2] * 11, [0, 1] + [2] * 9])
    got = ssd_kernels.causal_conv1d(x, w, bias, seq_idx=seq_idx, activation="silu")
    assert seen == {"layout": ((3, 6, 11), 1), "seq_dtype": torch.int32}
    assert got.shape == x.shape
    torch.testing.assert_close(got, ssd.causal_conv1d(x, w, bias, seq_idx, "silu"))


def test_cpu_and_switch_take_hymoe_kernels(monkeypatch):
    cpu = torch.zeros(1)
    assert ssd_kernels._kernels_for(cpu) is None  # CPU: hymoe's, nothing imported
    monkeypatch.setattr(ssd_kernels, "_mode", "auto")
    cuda_like = types.SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(ssd_kernels, "kernels", lambda: "fused")
    assert ssd_kernels._kernels_for(cuda_like) == "fused"
    ssd_kernels.set_kernels("hymoe")
    assert ssd_kernels._kernels_for(cuda_like) is None
    with pytest.raises(ValueError, match="HYMOE_SSD_KERNELS"):
        ssd_kernels.set_kernels("mamba")


def test_missing_package_is_reported():
    with pytest.raises(ImportError):
        ssd_kernels._import_skipping_package_init("hymoe_no_such_package.ops.x")
    k = ssd_kernels.Kernels(None, None, "mamba-ssm not loadable: X", "no ext")
    assert "hymoe ssd_chunk_scan (mamba-ssm not loadable: X)" in k.describe()
