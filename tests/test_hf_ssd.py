"""The own chunked SSD scan (hymoe.model.ssd.ssd_chunk_scan) against transformers' NemotronH
PyTorch Mamba-2 path (``mamba2_chunk_scan`` in modeling_nemotron_h, the code HF runs without
mamba-ssm): outputs, final states and the gradients of every input, in fp32 on CPU."""

import pytest
import torch

from hymoe.model.ssd import ssd_chunk_scan

nemotron_h = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")


def inputs(b=2, L=100, h=4, p=8, g=2, n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).requires_grad_()

    return dict(
        x=r(b, L, h, p), dt=r(b, L, h, shift=-1.0), A=(-torch.rand(h, generator=gen) - 0.3)
        .requires_grad_(), B=r(b, L, g, n, scale=0.5), C=r(b, L, g, n, scale=0.5), D=r(h),
        dt_bias=r(h, scale=0.3), initial_states=r(b, h, p, n, scale=0.2),
    )


def hf_scan(t, chunk, dt_limit):
    return nemotron_h.mamba2_chunk_scan(
        t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=chunk, D=t["D"],
        dt_bias=t["dt_bias"], initial_states=t["initial_states"], dt_softplus=True,
        dt_limit=dt_limit, return_final_states=True,
    )


def our_scan(t, chunk, dt_limit):
    return ssd_chunk_scan(
        t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=chunk, D=t["D"],
        dt_bias=t["dt_bias"], initial_states=t["initial_states"], dt_softplus=True,
        dt_limit=dt_limit, return_final_states=True,
    )


@pytest.mark.parametrize("L, chunk, g, dt_limit", [
    (100, 16, 2, (0.0, float("inf"))),  # L not a multiple of the chunk, 2 groups
    (64, 32, 4, (1e-3, float("inf"))),  # HF's default clamp (time_step_min)
    (7, 16, 1, (0.05, 0.5)),  # shorter than one chunk, both clamp ends
])
def test_forward_and_gradients_equal_transformers(L, chunk, g, dt_limit):
    ours_in, theirs_in = inputs(L=L, g=g), inputs(L=L, g=g)
    y1, s1 = our_scan(ours_in, chunk, dt_limit)
    y2, s2 = hf_scan(theirs_in, chunk, dt_limit)
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s1, s2, rtol=1e-4, atol=1e-5)
    gen = torch.Generator().manual_seed(9)
    wy, ws = torch.randn(y1.shape, generator=gen), torch.randn(s1.shape, generator=gen)
    ((y1 * wy).sum() + (s1 * ws).sum()).backward()
    ((y2 * wy).sum() + (s2 * ws).sum()).backward()
    for name in ours_in:
        a, b = ours_in[name].grad, theirs_in[name].grad
        scale = b.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, scale), msg=name)
