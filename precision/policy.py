"""Per-module precision policy: which format each linear layer computes in, and why.

Rules are ``GLOB=FORMAT`` strings matched against module names (first match wins), then the
"last fraction of layers in high precision" rule, then the recipe's format. The same function
answers for the trainer and for ``hymoe precision show``, so what is shown is what runs.
"""

from __future__ import annotations

import fnmatch
import re

from hymoe.precision.config import PrecisionConfig

HIGH = "bf16"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def high_precision_layers(num_layers: int, fraction: float) -> set[int]:
    """Indices (0-based, global) of the last ``round(fraction·num_layers)`` layers."""
    n = round(num_layers * fraction)
    return set(range(num_layers - n, num_layers))


def decide(name: str, layer: int | None, num_layers: int, cfg: PrecisionConfig) -> tuple[str, str]:
    """(format, reason) for the linear layer ``name`` in global layer ``layer`` (None: outside
    the layer stack, e.g. the output head)."""
    if cfg.recipe in ("bf16", "fp32"):
        return HIGH, f"recipe {cfg.recipe}"
    for rule in cfg.rules:
        glob, fmt = rule.split("=")
        if fnmatch.fnmatchcase(name, glob) or fnmatch.fnmatchcase(name, f"*.{glob}"):
            if fmt == "nvfp4" or fmt == "mxfp8":
                fmt = fmt if cfg.recipe in ("nvfp4", "mxfp8") else HIGH
            return fmt, f"rule {rule}"
    if layer is not None and layer in high_precision_layers(num_layers, cfg.bf16_last_fraction):
        return HIGH, f"last {cfg.bf16_last_fraction:.0%} of layers"
    return cfg.recipe, f"recipe {cfg.recipe}"


def layer_index(name: str, local_to_global: dict[int, int] | None = None) -> int | None:
    m = _LAYER.search(name)
    if m is None:
        return None
    local = int(m.group(1))
    return local_to_global.get(local, local) if local_to_global else local
