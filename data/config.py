"""Data configuration (the ``data`` group of a recipe)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    # Folder written by `hymoe data prepare` (manifest.json, tokenizer.json, shard-*.tar).
    path: str = "???"
    # If the folder is missing, build it from the embedded demo corpus (the Python standard
    # library's own source) instead of failing. Only for demo/CI recipes.
    prepare_demo_if_missing: bool = False
    # Tokenizer vocabulary trained for the demo corpus.
    demo_vocab_size: int = 2048
    # Bytes of demo corpus to use (≤ 10 MB).
    demo_max_bytes: int = 3_000_000
