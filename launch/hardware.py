"""GPU specifications the planner needs: memory, dense tensor-core peaks per format, HBM and
interconnect bandwidth, NVLink domain size.

All peaks are dense (no 2:4 sparsity), per GPU, from NVIDIA's public data sheets; the BF16 ones
are ``hymoe.train.mfu.PEAK_BF16_TFLOPS`` (what MFU in metrics.jsonl divides by), so the planner's
MFU and the trainer's agree. Bandwidths are per GPU and per direction.
"""

from __future__ import annotations

from dataclasses import dataclass

from hymoe.train.mfu import PEAK_BF16_TFLOPS


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float  # usable HBM, 1e9 bytes
    bf16_tflops: float
    fp8_tflops: float
    fp4_tflops: float | None  # None: no FP4 tensor cores (Hopper)
    hbm_tbps: float
    nvlink_gbps: float  # per direction
    nvlink_domain: int  # GPUs that reach each other over NVLink (HGX board or NVL72 rack)
    network_gbps: float  # scale-out NIC per GPU, GB/s
    mx_formats: bool  # block-scaled MXFP8/NVFP4 in hardware (Blackwell)

    def peak_tflops(self, fmt: str) -> float:
        """Dense peak for GEMMs in ``fmt`` (bf16, mxfp8, nvfp4). Formats the GPU cannot run
        natively are emulated: quantize, then a BF16 GEMM (hymoe's emulated backend)."""
        if fmt == "nvfp4" and self.fp4_tflops and self.mx_formats:
            return self.fp4_tflops
        if fmt == "mxfp8" and self.mx_formats:
            return self.fp8_tflops
        return self.bf16_tflops


GPUS = {
    # H100 SXM5 (H100 data sheet): BF16 989 / FP8 1,979 TFLOPS dense, 80 GB HBM3 at 3.35 TB/s,
    # NVLink 4 900 GB/s (450 each way), 8-GPU HGX board, ConnectX-7 400 Gb/s per GPU.
    "h100": GPU("h100", 80, PEAK_BF16_TFLOPS["H100"], 1979, None, 3.35, 450, 8, 50, False),
    # H200 SXM (H200 data sheet): H100's compute, 141 GB HBM3e at 4.8 TB/s.
    "h200": GPU("h200", 141, PEAK_BF16_TFLOPS["H200"], 1979, None, 4.8, 450, 8, 50, False),
    # B200 in HGX/DGX B200 (DGX B200 data sheet: 72 PF FP8 / 144 PF FP4 sparse for 8 GPUs,
    # 1,440 GB):
    # BF16 2.25 / FP8 4.5 / FP4 9 PFLOPS dense, 180 GB HBM3e at 8 TB/s, NVLink 5 1.8 TB/s
    # (900 each way), 8-GPU board, ConnectX-7 400 Gb/s.
    "b200": GPU("b200", 180, PEAK_BF16_TFLOPS["B200"], 4500, 9000, 8.0, 900, 8, 50, True),
    # GB200 NVL72 (data sheet: 360 PF BF16, 720 PF FP8, 1,440 PF FP4 sparse; 13.4 TB HBM3e for
    # 72 GPUs): BF16 2.5 / FP8 5 / FP4 10 PFLOPS dense per GPU, 186 GB at 8 TB/s, 72-GPU NVLink
    # domain at 1.8 TB/s, ConnectX-7 400 Gb/s.
    "gb200": GPU("gb200", 186, PEAK_BF16_TFLOPS["GB200"], 5000, 10000, 8.0, 900, 72, 50, True),
    # GB300 NVL72 (data sheet: 1,080 PF FP4 dense, 720 PF FP8 and 360 PF BF16 sparse, 21 TB
    # HBM3e for 72 GPUs): BF16 2.5 / FP8 5 / FP4 15 PFLOPS dense per GPU (the "3x" FP4 over FP8
    # of the Nemotron 3 paper), 288 GB at 8 TB/s, 72-GPU NVLink domain, ConnectX-8 800 Gb/s.
    "gb300": GPU("gb300", 288, PEAK_BF16_TFLOPS["GB300"], 5000, 15000, 8.0, 900, 72, 100, True),
}


def gpu(name: str) -> GPU:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"--gpu: {name!r} is not one of {', '.join(GPUS)}") from None
