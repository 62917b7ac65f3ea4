"""Loss vs position (``hymoe eval position-loss``): does the model use long context? The per-token
negative log-likelihood at each position of long documents, averaged over documents; a model that
uses its context has a loss that keeps falling with position, one that cannot extrapolate has a
loss that rises past its trained length.

Documents: the first ``length`` + 1 tokens of every document of the prepared data that has that
many (in manifest order, up to ``docs``), each evaluated from its start, so position p is the p-th
token of a document. With ``packed``, rows of the training stream instead (documents concatenated
with EOD, as the model saw them in training without document masks): position = position in row.
Reported per position bin (``bins`` equal bins) and cumulatively (the mean NLL of positions
0..p, the quantity long-context papers plot).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def long_documents(data: str | Path, length: int, docs: int) -> list[np.ndarray]:
    """The first ``length`` + 1 tokens of up to ``docs`` documents that have that many."""
    from hymoe.data.blend import Source
    from hymoe.data.order import Dataset
    from hymoe.data.reader import ShardCache

    ds, cache = Dataset("data", Source(Path(data))), ShardCache()
    found = []
    for index in range(len(ds.shards)):
        shard = cache.open(ds, index)
        for i in np.flatnonzero(shard.lengths > length):
            found.append(np.array(shard.doc(int(i))[: length + 1], dtype=np.int64))
            if len(found) == docs:
                return found
    return found


def packed_rows(data: str | Path, length: int, docs: int, seed: int) -> list[np.ndarray]:
    from hymoe.data import PackedStream

    with PackedStream(Path(data), length, 1, num_streams=1, seed=seed) as stream:
        rows = []
        for _ in range(docs):
            b = next(stream)
            rows.append(torch.cat([b["tokens"][0], b["labels"][0, -1:]]).numpy())
    return rows


def run_position_loss(model, sequences: list[np.ndarray], bins: int) -> dict:
    from hymoe.train.eval_model import device_of

    length = len(sequences[0]) - 1
    total = np.zeros(length)
    for seq in sequences:
        t = torch.as_tensor(seq, device=device_of(model))[None]
        with torch.no_grad():
            nll = model(t[:, :-1], None, None, labels=t[:, 1:])[0]  # [length], chunked loss
        total += nll.double().cpu().numpy()
    mean = total / len(sequences)
    edges = np.unique(np.linspace(0, length, bins + 1).round().astype(int))
    cumulative = np.cumsum(mean) / np.arange(1, length + 1)
    return {
        "task": "position-loss", "length": length, "sequences": len(sequences),
        "mean_nll": float(mean.mean()),
        "bins": [{"start": int(a), "end": int(b), "mean_nll": float(mean[a:b].mean())}
                 for a, b in zip(edges[:-1], edges[1:])],
        "cumulative": [{"position": int(b), "mean_nll": float(cumulative[b - 1])} for b in edges[1:]],
    }


def write_outputs(result: dict, out: Path) -> list[Path]:
    """position_loss.json and position_loss.png in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "position_loss.json").write_text(json.dumps(result, indent=1))
    mid = [(b["start"] + b["end"]) / 2 for b in result["bins"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(mid, [b["mean_nll"] for b in result["bins"]], "o-", ms=3, label="mean NLL in the bin")
    ax.plot([c["position"] for c in result["cumulative"]],
            [c["mean_nll"] for c in result["cumulative"]], "-", label="cumulative mean NLL")
    ax.set_xscale("log")
    ax.set_xlabel("position in the sequence (tokens)")
    ax.set_ylabel("negative log-likelihood (nats)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(f"loss vs position over {result['sequences']} sequences of {result['length']} "
                 f"tokens\n{result.get('checkpoint', '')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "position_loss.png", dpi=110)
    plt.close(fig)
    return [out / "position_loss.json", out / "position_loss.png"]
