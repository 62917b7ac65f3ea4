"""The random stream for stochastic rounding: seeded per (seed, rank), saved in checkpoints.

Stochastic rounding must not share torch's global generator: dropout, data shuffling or an extra
`torch.rand` elsewhere would shift its draws, and a resumed run would not repeat them. One
`StochasticRoundingRNG` per process owns a `torch.Generator` on the compute device; its state goes
into the trainer's checkpoint next to the other RNG states.
"""

from __future__ import annotations

from typing import Any

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    # A fixed 64-bit mixer, so that nearby (seed, rank) pairs give unrelated streams.
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, rank: int) -> int:
    """A 63-bit generator seed from the run seed and the rank (deterministic, distinct per rank)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (rank & _MASK64)) >> 1


class StochasticRoundingRNG:
    """Owns the `torch.Generator` that stochastic rounding draws from.

    Args:
        seed: the run's seed.
        rank: this process's global rank (each rank draws a different stream).
        device: where the quantized tensors live (the generator must be on the same device type).
    """

    def __init__(self, seed: int, rank: int = 0, device: torch.device | str = "cpu"):
        self.seed = int(seed)
        self.rank = int(rank)
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(derive_seed(self.seed, self.rank))

    def state_dict(self) -> dict[str, Any]:
        """{"seed", "rank", "state": uint8 CPU tensor} — everything needed to repeat the draws."""
        return {"seed": self.seed, "rank": self.rank, "state": self.generator.get_state().clone()}

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Restore the stream. With `strict`, a different seed or rank is an error: resuming with
        another layout is a decision the caller takes (e.g. by building a fresh RNG instead)."""
        if strict and (state["seed"], state["rank"]) != (self.seed, self.rank):
            raise ValueError(
                f"stochastic-rounding RNG state is for seed={state['seed']} rank={state['rank']}, "
                f"this process has seed={self.seed} rank={self.rank}"
            )
        self.seed, self.rank = int(state["seed"]), int(state["rank"])
        self.generator.set_state(state["state"].cpu())

    def __repr__(self) -> str:
        return f"StochasticRoundingRNG(seed={self.seed}, rank={self.rank}, device={self.device})"
