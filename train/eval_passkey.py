"""Passkey retrieval (``hymoe eval passkey``), in the style of RULER's needle-in-a-haystack: a random
number is hidden at a given depth of filler text of a given length, and the model is asked for it.

Score: exact greedy retrieval. The prompt is followed by the passkey's tokens and the whole
sequence is run once; a trial counts when the argmax at every answer position is the passkey's
next token — exactly the condition for greedy decoding to produce the passkey as its first tokens,
at the cost of one forward pass instead of one per generated token. Reported beside it: the share
of passkey tokens predicted right and the passkey's mean log-probability per token.

Every prompt is exactly ``length`` tokens including the answer; the needle starts at a filler
sentence boundary at ``depth`` (0: right after the instructions, 1: just before the question).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

INSTRUCTION = ("A pass key is hidden somewhere in the long text below. Find it and remember it: "
               "you will be asked for it at the end.\n\n")
FILLER = ("The river keeps running past the old mill. Wheat turns gold in the late summer fields. "
          "Nothing in these lines needs remembering.\n")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class Prompt:
    tokens: list[int]  # prompt + answer, exactly the requested length
    answer: list[int]  # the passkey's tokens (the last len(answer) of ``tokens``)
    key: str
    needle_at: int  # token index where the needle starts


def build_prompt(tok, length: int, depth: float, key: str) -> Prompt:
    """Token ids of instructions, filler with the needle at ``depth``, question and answer."""
    def ids(text):
        return tok.encode(text).ids

    head, question, needle = ids(INSTRUCTION), ids(QUESTION), ids(NEEDLE.format(key=key))
    answer, sentence = ids(" " + key), ids(FILLER)
    room = length - len(head) - len(needle) - len(question) - len(answer)
    if room < len(sentence):
        raise ValueError(f"length {length} leaves no room for filler (the fixed parts take "
                         f"{length - room} tokens); use a longer length")
    filler = (sentence * (room // len(sentence) + 1))[:room]
    cut = int(round(depth * room / len(sentence))) * len(sentence)
    cut = min(cut, (room // len(sentence)) * len(sentence))  # at a sentence boundary
    tokens = head + filler[:cut] + needle + filler[cut:] + question + answer
    assert len(tokens) == length
    return Prompt(tokens, answer, key, len(head) + cut)


def score(model, prompt: Prompt) -> dict:
    """One forward over the prompt + answer: exact greedy match, token accuracy, log-prob."""
    from hymoe.train.eval_model import device_of, logits_of_last

    n = len(prompt.answer)
    tokens = torch.tensor([prompt.tokens], device=device_of(model))
    with torch.no_grad(), logits_of_last(model, n + 1):
        logits = model(tokens, None, None)[0, :n].float()  # positions predicting each answer token
    answer = torch.tensor(prompt.answer, device=logits.device)
    predicted = logits.argmax(-1)
    logprob = torch.log_softmax(logits, -1).gather(1, answer[:, None]).mean()
    return {"exact": bool((predicted == answer).all()),
            "token_accuracy": float((predicted == answer).float().mean()),
            "logprob": float(logprob), "predicted": predicted.tolist()}


def run_passkey(model, tok, lengths: list[int], depths: list[float], trials: int, digits: int,
                seed: int) -> dict:
    rng = random.Random(seed)
    cells, records = [], []
    for length in lengths:
        for depth in depths:
            results = []
            for t in range(trials):
                key = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
                prompt = build_prompt(tok, length, depth, key)
                r = score(model, prompt)
                r.update(length=length, depth=depth, trial=t, key=key,
                         predicted_text=tok.decode(r["predicted"]), needle_at=prompt.needle_at)
                results.append(r)
            records += results
            cells.append({
                "length": length, "depth": depth,
                "accuracy": sum(r["exact"] for r in results) / trials,
                "token_accuracy": sum(r["token_accuracy"] for r in results) / trials,
                "logprob": sum(r["logprob"] for r in results) / trials,
            })
    by_length = {str(L): sum(c["accuracy"] for c in cells if c["length"] == L) / len(depths)
                 for L in lengths}
    return {
        "task": "passkey",
        "method": "exact greedy retrieval, checked in one forward pass (teacher-forced argmax at "
                  "every passkey token)",
        "lengths": lengths, "depths": depths, "trials": trials, "digits": digits, "seed": seed,
        "cells": cells, "accuracy_by_length": by_length,
        "accuracy": sum(c["accuracy"] for c in cells) / len(cells),
        "trials_detail": records,
    }


def write_outputs(result: dict, out: Path) -> list[Path]:
    """passkey.json and passkey.png (accuracy, length × depth) in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "passkey.json").write_text(json.dumps(result, indent=1))
    lengths, depths = result["lengths"], result["depths"]
    grid = [[next(c["accuracy"] for c in result["cells"] if c["length"] == L and c["depth"] == d)
             for L in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.45 * len(depths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [_label(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="exact retrieval")
    ax.set_title(f"passkey retrieval · {Path(result.get('checkpoint', '')).name}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "passkey.png", dpi=110)
    plt.close(fig)
    return [out / "passkey.json", out / "passkey.png"]


def _label(n: int) -> str:
    if n % (1 << 20) == 0:
        return f"{n >> 20}M"
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)
