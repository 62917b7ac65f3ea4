"""Which backend runs the quantized GEMMs: Transformer Engine's native kernels or hymoe's emulation.

``precision.backend``:
- ``emulated``: hymoe's bit-exact PyTorch emulation (``apply.py``) on any device;
- ``te``: Transformer Engine's native NVFP4 (``NVFP4BlockScaling``) / MXFP8 — needs a CUDA device of
  compute capability >= 10.0 (Blackwell) and ``import transformer_engine`` (>= 2.7) to succeed;
  anything else fails at start-up with the reason (the GPU's capability, or "no CUDA device");
- ``auto``: ``te`` where it can run, ``emulated`` elsewhere; ``select_backend`` returns the choice
  with a one-line reason for the log.

For the ``te`` backend, ``te_precision_kwargs`` gives megatron-core 0.16.1's TransformerConfig fields:
the global ``fp4``/``fp4_recipe`` (or ``fp8``/``fp8_recipe``) and a per-module ``quant_recipe`` built
from the same policy that ``hymoe precision show`` prints. The per-module part is what quantizes the
hybrid stack: megatron-core 0.16.1's ``MambaStack`` opens FP8 contexts per layer but ignores ``fp4``,
so each module's TE quantization params enable NVFP4 themselves (``override_nonquantized_autocast``).
TE reads the NVFP4 recipe switches from the environment when it is imported
(``NVTE_NVFP4_DISABLE_RHT`` …); ``select_backend`` sets them from the config first.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
from hymoe.precision.config import PrecisionConfig, PrecisionConfigError

MIN_CAPABILITY = (10, 0)
MIN_TE_VERSION = "2.7.0.dev0"  # megatron-core's own threshold for NVFP4BlockScaling
# PrecisionConfig switch -> the environment variable TE 2.x reads at import (recipe defaults).
TE_RECIPE_ENV = {
    "disable_rht": "NVTE_NVFP4_DISABLE_RHT",
    "disable_stochastic_rounding": "NVTE_NVFP4_DISABLE_STOCHASTIC_ROUNDING",
    "disable_2d_quantization": "NVTE_NVFP4_DISABLE_2D_QUANTIZATION",
}
# megatron-core's per-module TE config (megatron/core/extensions/transformer_engine.py).
_TE_CONFIG_TYPE_KEY = "transformer_engine_config_type"


@dataclasses.dataclass(frozen=True)
class BackendChoice:
    backend: str  # "te" | "emulated"
    reason: str  # one line for the log


def _cuda_device() -> tuple[str, tuple[int, int]] | None:
    """(name, compute capability) of the current CUDA device, or None."""
    if not torch.cuda.is_available():
        return None
    idx = torch.cuda.current_device()
    return torch.cuda.get_device_name(idx), tuple(torch.cuda.get_device_capability(idx))


def _import_te():
    """`import transformer_engine`; TE without its CUDA libraries raises RuntimeError, not
    ImportError (environment.md), so callers catch both."""
    import transformer_engine

    return transformer_engine


def _te_version(te) -> str:
    version = getattr(te, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("transformer_engine")
    return str(version)


def _version_ok(version: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) >= Version(MIN_TE_VERSION)
    except InvalidVersion:
        return False


def te_environment(cfg: PrecisionConfig) -> dict[str, str]:
    """The NVTE_NVFP4_* variables that make TE's NVFP4BlockScaling defaults match ``cfg``."""
    return {env: "1" if getattr(cfg, field) else "0" for field, env in TE_RECIPE_ENV.items()}


def _apply_te_environment(cfg: PrecisionConfig) -> None:
    """Set the recipe switches before TE is imported; a conflicting value already in the
    environment, or a TE imported earlier with other defaults, is an error, not a silent change."""
    for field, (env, want) in zip(TE_RECIPE_ENV, te_environment(cfg).items()):
        have = os.environ.get(env)
        if have is not None and (have == "1") != (want == "1"):
            raise PrecisionConfigError(
                f"precision.{field}={getattr(cfg, field)} but the environment has {env}={have}; "
                "unset it or make them agree"
            )
        os.environ[env] = want
    recipe_mod = sys.modules.get("transformer_engine.common.recipe")
    cls = getattr(recipe_mod, "NVFP4BlockScaling", None) if recipe_mod else None
    if cls is not None:
        for field, env in TE_RECIPE_ENV.items():
            if bool(getattr(cls, field, getattr(cfg, field))) != getattr(cfg, field):
                raise PrecisionConfigError(
                    f"precision.{field}={getattr(cfg, field)}, but Transformer Engine was imported "
                    f"before hymoe could set {env}; set it in the environment"
                )


def te_support() -> tuple[bool, str]:
    """(whether TE's native NVFP4/MXFP8 can run here, why / why not) — one line."""
    dev = _cuda_device()
    if dev is None:
        return False, "no CUDA device"
    name, cap = dev
    gpu = f"{name} (compute capability {cap[0]}.{cap[1]})"
    if tuple(cap) < MIN_CAPABILITY:
        return False, (
            f"{gpu}: native NVFP4 needs compute capability >= "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Blackwell)"
        )
    try:
        te = _import_te()
    except (ImportError, RuntimeError, OSError) as e:
        return False, f"{gpu}, but transformer_engine is not importable ({type(e).__name__}: {e})"
    version = _te_version(te)
    if not _version_ok(version):
        return False, f"{gpu}, but transformer_engine {version} < {MIN_TE_VERSION[:3]}"
    return True, f"{gpu}, transformer_engine {version}"


def select_backend(cfg: PrecisionConfig) -> BackendChoice:
    """Resolve ``cfg.backend`` (auto | emulated | te) on this machine.

    Raises PrecisionConfigError for ``te`` where TE's native kernels cannot run, naming the GPU's
    capability (or "no CUDA device"). High-precision recipes (bf16, fp32) quantize nothing: any
    backend but an explicit ``te`` resolves to ``emulated`` (a no-op for them).
    """
    if cfg.backend == "emulated":
        return BackendChoice("emulated", "emulated (precision.backend=emulated)")
    if cfg.backend == "auto" and cfg.recipe in ("bf16", "fp32"):
        return BackendChoice("emulated", f"emulated: recipe {cfg.recipe} quantizes no GEMM")
    if cfg.recipe == "nvfp4":
        _apply_te_environment(cfg)
    ok, why = te_support()
    if cfg.backend == "te":
        if not ok:
            raise PrecisionConfigError(
                f"precision.backend=te: Transformer Engine's native {cfg.recipe} cannot run: {why}; "
                "use precision.backend=auto or emulated"
            )
        return BackendChoice("te", f"te: {why}")
    if cfg.backend != "auto":
        raise PrecisionConfigError(f"precision.backend: unknown {cfg.backend!r}")
    if ok:
        return BackendChoice("te", f"auto -> te: {why}")
    return BackendChoice("emulated", f"auto -> emulated: {why}")


def check_fp4_fp8(kwargs: dict) -> None:
    """Reject TransformerConfig kwargs that enable fp4 and fp8 together (megatron-core would only
    fail later, inside TransformerConfig; this names the fields up front)."""
    if kwargs.get("fp4") and kwargs.get("fp8"):
        raise PrecisionConfigError(
            f"precision: fp4={kwargs['fp4']!r} and fp8={kwargs['fp8']!r} cannot be combined; "
            "NVFP4 recipes keep single layers in MXFP8 through the per-module rules instead"
        )


def _te_module_config(fmt: str) -> dict:
    """megatron-core's per-module TE quantization params for one of our formats."""
    recipe = {"override_quantized_autocast": True, "override_nonquantized_autocast": True}
    if fmt == "nvfp4":
        recipe["fp4_quantization_recipe"] = "nvfp4"
    elif fmt == "mxfp8":
        recipe.update(fp8_quantization_recipe="mxfp8", fp8_format="e4m3")
    # bf16 / fp32: neither recipe -> TE runs the module unquantized.
    return {_TE_CONFIG_TYPE_KEY: "TEQuantizationParams", "training_recipe": recipe}


def te_quant_recipe_dict(layer_formats: list[tuple[str, str]]) -> dict:
    """A megatron-core ``RecipeConfig`` dict (configs + ordered glob matchers) that gives each
    module of ``layer_formats`` [(module name, format)] — e.g. ``apply.plan``'s rows — its format,
    and every other TE module BF16."""
    configs, matchers = {}, {}
    for i, (name, fmt) in enumerate(layer_formats):
        configs.setdefault(fmt, _te_module_config(fmt))
        # Module names hold only [A-Za-z0-9_.]: as a glob each matches exactly itself.
        matchers[f"m{i}"] = {"type": "glob", "pattern": name, "config": fmt, "enabled": True}
    configs.setdefault("bf16", _te_module_config("bf16"))
    matchers["default"] = {"type": "glob", "pattern": "*", "config": "bf16", "enabled": True}
    return {"configs": configs, "matchers": matchers}


def te_precision_kwargs(
    cfg: PrecisionConfig,
    layer_formats: list[tuple[str, str]] | None = None,
    extra: dict | None = None,
) -> dict:
    """megatron-core 0.16.1 TransformerConfig kwargs for running ``cfg`` on Transformer Engine.

    nvfp4 -> fp4="e2m1", fp4_recipe="nvfp4"; mxfp8 -> fp8="e4m3", fp8_recipe="mxfp8"; bf16/fp32 ->
    nothing. With ``layer_formats`` (the policy's [(module name, format)]), also
    ``quant_recipe``: a per-module RecipeConfig (see the module docstring for why the hybrid stack
    needs it). ``extra``: other TransformerConfig kwargs the caller will pass; they are merged in and
    fp4 together with fp8 is rejected.
    """
    kw: dict = dict(extra or {})
    if cfg.recipe == "nvfp4":
        kw.update(fp4="e2m1", fp4_recipe="nvfp4")
    elif cfg.recipe == "mxfp8":
        kw.update(fp8="e4m3", fp8_recipe="mxfp8")
    check_fp4_fp8(kw)
    if layer_formats is not None and cfg.recipe in ("nvfp4", "mxfp8"):
        from megatron.core.quantization.quant_config import RecipeConfig

        kw["quant_recipe"] = RecipeConfig.from_config_dict(te_quant_recipe_dict(layer_formats))
    return kw
