"""Numerics: NVFP4 and MXFP8 formats, emulated quantized GEMMs, the per-module precision policy,
the TE/emulated backend choice and quantization telemetry (docs/precision.md)."""
