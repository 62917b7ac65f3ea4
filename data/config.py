"""Data configuration (the ``data`` group of a recipe). docs/data.md explains every field.

OmegaConf 2.3 reads `X | None`, `dict[...]` and `list[...]` annotations (checked).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hymoe.data.errors import DataError


@dataclass
class DatasetEntry:
    # A folder written by `hymoe data prepare`; relative paths are relative to `data.path`.
    path: str = "???"
    # Longest context inside a row of this dataset: rows are cut into independent segments of at
    # most this many tokens (e.g. 4096 beside 1M-token long-context data). null: no cut.
    context_len: int | None = None


@dataclass
class PhaseConfig:
    # Weights from this phase's start on (dataset name → weight; normalised; missing = 0).
    blend: dict[str, float] = field(default_factory=dict)
    # Start, as a fraction of the run's tokens (e.g. 0.94), or as global tokens. Set one.
    start_fraction: float | None = None
    start_tokens: int | None = None


@dataclass
class DataConfig:
    # Folder written by `hymoe data prepare` (manifest.json, tokenizer.json, shard-*.tar).
    # With `datasets`, the folder that their relative paths start from.
    path: str = "???"
    # If the folder is missing, build it from the embedded demo corpus (the Python standard
    # library's own source) instead of failing. Only for demo/CI recipes.
    prepare_demo_if_missing: bool = False
    # Tokenizer vocabulary trained for the demo corpus.
    demo_vocab_size: int = 2048
    # Bytes of demo corpus to use (≤ 10 MB).
    demo_max_bytes: int = 3_000_000
    # Several datasets (name → entry); empty: read `path` alone.
    datasets: dict[str, DatasetEntry] = field(default_factory=dict)
    # Weights of the first phase (name → weight). Required with more than one dataset.
    blend: dict[str, float] = field(default_factory=dict)
    # Later phases, in order of their start (Nemotron 3: phase 2 at 0.94 of the tokens).
    phases: list[PhaseConfig] = field(default_factory=list)
    # Independent read streams over all DP ranks; fixed for the life of a run (taken from the
    # checkpoint on resume). A run can later resume on any DP size up to this number. 0: auto
    # (max(64, dp * num_workers), at most the smallest dataset's document count).
    num_streams: int = 0
    # Reader processes per rank (0: read in the training process).
    num_workers: int = 0
    # Micro-batches each worker reads ahead.
    prefetch_factor: int = 2
    # Threads per reading process that fetch and check (sha256) the shards the streams read next,
    # while rows are packed from the current ones (0: fetch and check when a stream gets there).
    # Each is one connection to an object store: raise to 4-8 there.
    shard_prefetch_threads: int = 2
    # A shard that fails its manifest check: `error` stops with the shard and sample named;
    # `skip` skips the shard's documents and counts them (metrics `data/skipped_*`).
    on_corrupt: str = "error"
    # Zero the loss where the input is EOD (its label is the next document's first token),
    # as megatron's --eod-mask-loss.
    eod_mask_loss: bool = False
    # Held-out documents for the validation loss (train.eval_interval): a folder (or remote
    # location) prepared with the training data's tokenizer (`hymoe data prepare --tokenizer`).
    valid_path: str | None = None

    def validate(self) -> None:
        """Raise `DataError` naming the field for values no stream can run with."""
        if self.on_corrupt not in ("error", "skip"):
            raise DataError(f"data.on_corrupt: must be 'error' or 'skip', got {self.on_corrupt!r}")
        for name in ("num_streams", "num_workers", "shard_prefetch_threads"):
            if getattr(self, name) < 0:
                raise DataError(f"data.{name}: must be >= 0, got {getattr(self, name)}")
        if self.prefetch_factor < 1:
            raise DataError(f"data.prefetch_factor: must be >= 1, got {self.prefetch_factor}")
