"""Precision configuration (the ``precision`` group of a recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field

RECIPES = ("bf16", "fp32", "nvfp4", "mxfp8")


class PrecisionConfigError(ValueError):
    pass


@dataclass
class PrecisionConfig:
    # bf16 | fp32 | nvfp4 | mxfp8: the format of the GEMMs the policy does not keep in high precision.
    recipe: str = "bf16"
    # Dtype of parameters and activations: auto = bf16 on GPU, fp32 on CPU (bf16 matmuls are
    # ~35x slower than fp32 on CPUs; the quantized GEMMs are emulated exactly either way).
    compute_dtype: str = "auto"
    # auto | emulated | te  (te: Transformer Engine's native NVFP4, Blackwell only).
    backend: str = "auto"
    # Glob rules on module names → format, first match wins (Nemotron 3 defaults; docs/precision).
    rules: list = field(
        default_factory=lambda: [
            "*.linear_qkv=bf16",
            "*.linear_proj=bf16",
            "*fc1_latent_proj=bf16",
            "*fc2_latent_proj=bf16",
            "mtp.*=bf16",
            "*mixer.out_proj=mxfp8",
            "output_layer=bf16",
        ]
    )
    # Keep the last fraction of layers in high precision (Nemotron 3: 0.15).
    bf16_last_fraction: float = 0.15
    # NVFP4 recipe switches, as in Transformer Engine's NVFP4BlockScaling.
    disable_rht: bool = False
    disable_stochastic_rounding: bool = False
    disable_2d_quantization: bool = False
    # Emulated backend on CPU: torch.compile the NVFP4 quantizer (same bits, ~5-10x faster, a few
    # seconds of compile per process): auto = for tensors of >= 2^18 elements, on, off.
    compile_quantizer: str = "auto"
    # Quantization telemetry every N steps (0: off): underflow, saturation, relative error, amax per
    # layer and GEMM operand (docs/precision.md).
    telemetry_interval: int = 0
    # A non-zero gradient that quantizes to all zeros: warn naming the layer (false) or stop (true).
    strict_zero_gradient: bool = False

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise PrecisionConfigError(
                f"precision.recipe: {self.recipe!r} is not one of {', '.join(RECIPES)}"
            )
        if self.compute_dtype not in ("auto", "bf16", "fp32"):
            raise PrecisionConfigError(
                f"precision.compute_dtype: must be auto, bf16 or fp32, got {self.compute_dtype!r}"
            )
        if self.backend not in ("auto", "emulated", "te"):
            raise PrecisionConfigError(
                f"precision.backend: must be auto, emulated or te, got {self.backend!r}"
            )
        if self.compile_quantizer not in ("auto", "on", "off"):
            raise PrecisionConfigError(
                f"precision.compile_quantizer: must be auto, on or off, got {self.compile_quantizer!r}"
            )
        if self.telemetry_interval < 0:
            raise PrecisionConfigError(
                f"precision.telemetry_interval: must be >= 0 (0 = off), got {self.telemetry_interval}"
            )
        if not 0.0 <= self.bf16_last_fraction <= 1.0:
            raise PrecisionConfigError(
                f"precision.bf16_last_fraction: must be in [0, 1], got {self.bf16_last_fraction}"
            )
        for i, rule in enumerate(self.rules):
            if not isinstance(rule, str) or rule.count("=") != 1 or rule.split("=")[1] not in (
                "bf16", "fp32", "nvfp4", "mxfp8"
            ):
                raise PrecisionConfigError(
                    f"precision.rules[{i}]: {rule!r} must look like 'GLOB=FORMAT' with FORMAT in "
                    "bf16, fp32, nvfp4, mxfp8"
                )
