"""Text from a checkpoint (``hymoe generate``): what a run has learned, read as text.

Decoding re-runs the whole sequence for every new token (the model's training forward, logits of
the last position only). That is exact by construction — the same code path the loss and the
evals use, Mamba scan and attention alike — and costs O(n²) in the generated length, which is
fine for the sanity check this is (a few hundred tokens); it is not a serving engine.

Sampling happens on CPU in fp32 from a seeded generator, so a seed gives the same text on any
device as long as the logits agree. ``temperature`` 0 is greedy decoding; ``top_k`` and ``top_p``
(nucleus) restrict the candidates before sampling, as in Hugging Face ``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1: no limit

    def check(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature: must be ≥ 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k: must be ≥ 0 (0 keeps every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p: must be in (0, 1], got {self.top_p}")


def candidates(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """fp32 [vocab] probabilities after temperature, top-k and top-p; zero outside the kept set.
    Ties at the top-k boundary keep every tied token; top-p keeps the smallest prefix of the
    sorted probabilities whose sum reaches ``top_p`` (at least one token)."""
    logits = logits.float() / s.temperature
    if s.top_k and s.top_k < logits.numel():
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, 0) - sorted_p  # mass of the tokens ranked above each
        drop = torch.zeros_like(probs, dtype=torch.bool)
        drop[order] = before >= s.top_p
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum()
    return probs


def next_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    """One token from the last position's logits [vocab]."""
    logits = logits.detach().float().cpu()
    if s.temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(candidates(logits, s), 1, generator=generator))


def generate(model, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
             seed: int = 0, stop: int | set[int] | None = None, max_length: int | None = None,
             on_token=None) -> list[int]:
    """The new tokens after ``prompt`` (not including it): at most ``max_new_tokens``, ending
    before a ``stop`` token (the end-of-document token, or a set of them) if one is drawn, and
    never past ``max_length`` tokens in all (the model's ``max_sequence_length``).
    ``on_token(new_tokens)`` is called after each one (the CLI streams the text with it)."""
    from hymoe.train.eval_model import device_of, logits_of_last

    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if max_length is not None and len(prompt) >= max_length:
        raise ValueError(f"the prompt has {len(prompt)} tokens, the model at most {max_length}: "
                         "no room to generate; shorten the prompt")
    sampling.check()
    stops = {stop} if isinstance(stop, int) else set(stop or ())
    generator = torch.Generator().manual_seed(seed)
    budget = max_new_tokens if max_length is None else min(max_new_tokens, max_length - len(prompt))
    dev = device_of(model)
    tokens, new = list(prompt), []
    with torch.no_grad(), logits_of_last(model, 1):
        for _ in range(budget):
            logits = model(torch.tensor([tokens], device=dev), None, None)[0, -1]
            t = next_token(logits, sampling, generator)
            if t in stops:
                break
            tokens.append(t)
            new.append(t)
            if on_token is not None:
                on_token(new)
    return new
