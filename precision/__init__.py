"""Numerics: NVFP4 and MXFP8 formats, emulated quantized GEMMs, and per-module precision policy."""
