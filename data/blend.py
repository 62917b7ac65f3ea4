"""What to read: named datasets, their weights, and the phases that switch the weights.

A `Blend` is a plain description (no files are opened here). Every row of every micro-batch comes
from one dataset, chosen by `choose`: the dataset whose share of the phase's tokens lags its weight
the most (Megatron's `build_blending_indices` rule). It is deterministic, needs no random numbers,
and keeps each dataset's realised token count within one row of `weight * tokens` at every point of
a phase (tests/test_data_blend.py checks the bound), which a random draw per row would only meet
within a few standard deviations.

Phases start at global token counts (all DP ranks together): Nemotron 3 switches to its phase-2
mix at 94% of the training tokens. A dataset keeps its read position across phases, so a dataset
used in two phases continues where it stopped instead of starting over.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hymoe.data.errors import DataError
from hymoe.data.remote import is_remote, join

SINGLE_NAME = "data"  # the dataset's name when a stream reads one directory (`PackedStream(path)`)


@dataclass(frozen=True)
class Source:
    """One prepared directory.

    context_len: longest context inside a row of this dataset: rows are cut into independent
    segments of at most this many tokens (separate `seq_idx` values and `cu_seqlens` entries), e.g.
    4096 for the short-context share of a 1M-token long-context stage. None: only documents cut.
    """

    path: Path | str  # a directory, or a remote location (str; hymoe.data.remote)
    context_len: int | None = None


@dataclass(frozen=True)
class Phase:
    """From `start_tokens` (global tokens consumed) on, rows are drawn with these weights."""

    start_tokens: int
    weights: tuple[float, ...]  # one per dataset of the blend, summing to 1


class Blend:
    """Named datasets and the phases of their weights.

    sources: name → prepared directory (or `Source`). weights: name → weight for the first phase
    (any non-negative numbers, normalised here; a missing name has weight 0). phases: the later
    phases as (start_tokens, weights) in increasing start order.
    """

    def __init__(
        self,
        sources: Mapping[str, str | Path | Source],
        weights: Mapping[str, float] | None = None,
        phases: Sequence[tuple[int, Mapping[str, float]]] = (),
    ):
        if not sources:
            raise DataError("a blend needs at least one dataset")
        self.names = list(sources)
        self.sources = [s if isinstance(s, Source) else Source(s if is_remote(s) else Path(s))
                        for s in sources.values()]
        for name, s in zip(self.names, self.sources):
            if not name or "/" in name:
                raise DataError(f"dataset name {name!r}: use a non-empty name without '/'")
            if s.context_len is not None and s.context_len < 1:
                raise DataError(f"datasets.{name}.context_len: must be >= 1 or null, "
                                f"got {s.context_len}")
        if weights is None:
            if len(self.names) != 1:
                raise DataError(f"blend: give weights for the datasets {self.names}")
            weights = {self.names[0]: 1.0}
        self.phases = [Phase(0, self._normalise(weights, "blend"))]
        for i, (start, w) in enumerate(phases, 1):
            if not isinstance(start, int) or start <= self.phases[-1].start_tokens:
                raise DataError(f"phases[{i - 1}]: start must come after the previous phase's "
                                f"start ({self.phases[-1].start_tokens} tokens), got {start}")
            self.phases.append(Phase(start, self._normalise(w, f"phases[{i - 1}].blend")))

    @classmethod
    def single(cls, path: str | Path) -> Blend:
        return cls({SINGLE_NAME: path})

    def _normalise(self, weights: Mapping[str, float], where: str) -> tuple[float, ...]:
        unknown = set(weights) - set(self.names)
        if unknown:
            raise DataError(f"{where}: {sorted(unknown)} are not datasets; known: {self.names}")
        if any(not w >= 0 for w in weights.values()):  # `not >=` also catches NaN
            raise DataError(f"{where}: weights must be >= 0, got {dict(weights)}")
        total = float(sum(weights.values()))
        if total <= 0:
            raise DataError(f"{where}: at least one weight must be > 0, got {dict(weights)}")
        return tuple(float(weights.get(n, 0.0)) / total for n in self.names)

    def phase_at(self, tokens: int) -> int:
        """Index of the phase in force after `tokens` global tokens."""
        i = 0
        while i + 1 < len(self.phases) and self.phases[i + 1].start_tokens <= tokens:
            i += 1
        return i

    def describe(self) -> list[dict]:
        """The phases as plain data (for logs and docs): [{start_tokens, weights{name: w}}]."""
        return [{"start_tokens": p.start_tokens,
                 "weights": {n: w for n, w in zip(self.names, p.weights) if w > 0}}
                for p in self.phases]


def choose(weights: Sequence[float], counts: Sequence[int], row_tokens: int) -> int:
    """The dataset for the next row: largest deficit `w * (T + row) - count`, first index on ties.

    counts: tokens each dataset has had in this phase so far (T is their sum).
    """
    total = sum(counts) + row_tokens
    best, best_gap = -1, -float("inf")
    for d, (w, c) in enumerate(zip(weights, counts)):
        if w > 0:
            gap = w * total - c
            if gap > best_gap:
                best, best_gap = d, gap
    return best


def blend_from_config(cfg, total_tokens: int | None = None) -> Blend:
    """A `Blend` from a `DataConfig`: `path` alone, or `datasets` (+ `blend`, `phases`).

    With `datasets`, relative dataset paths are taken relative to `path`. Phase starts given as a
    fraction (`start_fraction`) need `total_tokens` (train.steps * global_batch * seq_len).
    """
    if not cfg.datasets:
        if cfg.blend or cfg.phases:
            raise DataError("data.blend / data.phases need data.datasets (name → directory)")
        return Blend.single(cfg.path)
    base = cfg.path if cfg.path not in ("", "???") else "."
    sources = {}
    for name, d in cfg.datasets.items():
        if is_remote(d.path) or Path(d.path).is_absolute():
            p = d.path if is_remote(d.path) else Path(d.path)
        elif is_remote(base):  # a relative dataset under a remote base
            p = base if d.path in ("", ".") else join(base, d.path)
        else:
            p = Path(base) / d.path
        sources[name] = Source(p, d.context_len)
    phases = []
    for i, ph in enumerate(cfg.phases):
        has_frac, has_tok = ph.start_fraction is not None, ph.start_tokens is not None
        if has_frac == has_tok:
            raise DataError(f"data.phases[{i}]: set exactly one of start_fraction (e.g. 0.94) "
                            "or start_tokens")
        if has_frac:
            if not 0 < ph.start_fraction < 1:
                raise DataError(f"data.phases[{i}].start_fraction: must be in (0, 1), got "
                                f"{ph.start_fraction}")
            if total_tokens is None:
                raise DataError(f"data.phases[{i}].start_fraction needs the run's total tokens; "
                                "use start_tokens or pass total_tokens")
            start = round(ph.start_fraction * total_tokens)
        else:
            start = ph.start_tokens
        phases.append((start, dict(ph.blend)))
    return Blend(sources, dict(cfg.blend) if cfg.blend else None, phases)
