"""The layer-pattern language: one character per layer, as megatron-core's hybrid models use it.

``M`` Mamba-2 mixer, ``*`` self-attention, ``E`` mixture-of-experts MLP, ``-`` dense MLP.
``|`` marks a pipeline-stage boundary (it is not a layer). ``/`` starts a Multi-Token Prediction
depth: ``MEM*E/*E/*E`` is the main stack ``MEM*E`` plus two MTP depths, each one transformer layer of
attention + MoE. Example (Nemotron 3 Nano): ``MEMEM*EMEMEM*E...``.
"""

from __future__ import annotations

from dataclasses import dataclass

MAMBA, ATTENTION, MOE, MLP, STAGE, MTP = "M", "*", "E", "-", "|", "/"
# What one MTP depth may be: one transformer layer (attention + MoE, or attention + dense MLP).
MTP_DEPTHS = ("*E", "*-")
LAYER_SYMBOLS = (MAMBA, ATTENTION, MOE, MLP)
NAMES = {MAMBA: "mamba", ATTENTION: "attention", MOE: "moe", MLP: "mlp"}


class PatternError(ValueError):
    """A layer pattern that cannot be built; the message points at the position."""


@dataclass(frozen=True)
class LayerPattern:
    """A parsed pattern. ``layers`` has no stage marks; ``stages`` is the split at ``|``."""

    text: str
    layers: str
    stages: tuple[str, ...]
    mtp: tuple[str, ...] = ()  # one pattern per MTP depth

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def count(self, symbol: str) -> int:
        return self.layers.count(symbol)


def _point_at(text: str, pos: int) -> str:
    """The pattern with the offending position bracketed, on the same line: ' in "M[X]E"'."""
    return f' in "{text[:pos]}[{text[pos:pos + 1]}]{text[pos + 1:]}"'



def parse(text: str, field: str = "model.pattern") -> LayerPattern:
    """Parse and check a pattern string; errors name ``field`` and point at the offending position."""
    if not isinstance(text, str) or not text:
        raise PatternError(f"{field}: empty layer pattern; use characters {''.join(LAYER_SYMBOLS)}")
    for pos, ch in enumerate(text):
        if ch not in LAYER_SYMBOLS and ch not in (STAGE, MTP):
            raise PatternError(
                f"{field}: invalid character {ch!r} at position {pos} (valid: M mamba, * attention, "
                f"E moe, - mlp, | stage boundary, / MTP depth){_point_at(text, pos)}"
            )
    main, *depths = text.split(MTP)
    offset = len(main) + 1
    for depth in depths:
        if depth not in MTP_DEPTHS:
            raise PatternError(
                f"{field}: MTP depth {depth!r} at position {offset} must be one transformer layer, "
                f"one of {', '.join(MTP_DEPTHS)}{_point_at(text, offset)}"
            )
        if depth != depths[0]:
            raise PatternError(f"{field}: all MTP depths must be alike, got {depths}")
        offset += len(depth) + 1
    if not main:
        raise PatternError(f"{field}: empty main layer stack before '/'")
    stages = tuple(main.split(STAGE))
    offset = 0
    for stage in stages:
        if not stage:
            raise PatternError(f"{field}: empty pipeline stage at position {offset}{_point_at(text, offset)}")
        offset += len(stage) + 1
    return LayerPattern(text=text, layers=main.replace(STAGE, ""), stages=stages, mtp=tuple(depths))
