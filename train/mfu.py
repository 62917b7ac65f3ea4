"""Model FLOPs utilisation: achieved model FLOP/s per rank over the device's dense BF16 peak.

Peaks are the vendors' published dense BF16 tensor-core numbers (no sparsity). Unknown devices
(and CPUs) get no MFU, only the achieved TFLOP/s."""

from __future__ import annotations

import torch

# Dense BF16 peak TFLOP/s by device-name fragment (first match wins).
PEAK_BF16_TFLOPS = {
    "GB300": 2500.0, "B300": 2250.0, "GB200": 2500.0, "B200": 2250.0,
    "H200": 989.0, "H100": 989.0, "A100": 312.0,
}


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def throughput_metrics(tokens_per_s: float, flops_per_token: float, world_size: int) -> dict:
    """{'tflops_per_rank', and 'mfu' where the device's peak is known}."""
    tflops = tokens_per_s * flops_per_token / world_size / 1e12
    out = {"tflops_per_rank": tflops}
    peak = peak_tflops()
    if peak:
        out["mfu"] = tflops / peak
    return out
