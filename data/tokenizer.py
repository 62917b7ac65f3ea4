"""Byte-level BPE tokenizers (Hugging Face `tokenizers`), stored as one `tokenizer.json`.

Byte-level means every string, in any language or encoding mishap, round-trips exactly through
encode/decode with no unknown token, which is what a pretraining pipeline needs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from hymoe.data.errors import DataError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Special tokens come first, so EOD is id 0 and PAD is id 1 in every tokenizer trained here.
SPECIAL_TOKENS = (EOD_TOKEN, PAD_TOKEN)
TOKENIZER_FILE = "tokenizer.json"
# 256 byte symbols plus the special tokens: the smallest vocabulary a byte-level BPE can have.
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def tokenizer_file(path: str | Path) -> Path:
    """A tokenizer path may name the json file or a directory that holds `tokenizer.json`."""
    p = Path(path)
    return p / TOKENIZER_FILE if p.is_dir() else p


def train_bpe(files: Iterable[str | Path], vocab_size: int, out_path: str | Path) -> Path:
    """Train a byte-level BPE on text files (each file one document) and save it.

    `out_path` is the json file to write, or a directory to write `tokenizer.json` into.
    Returns the path written.
    """
    texts = (Path(f).read_bytes().decode("utf-8") for f in files)
    return train_bpe_from_texts(texts, vocab_size, out_path)


def train_bpe_from_texts(texts: Iterable[str], vocab_size: int, out_path: str | Path) -> Path:
    """Like `train_bpe`, from an iterable of documents (used for `.jsonl` inputs)."""
    if vocab_size < MIN_VOCAB:
        raise DataError(
            f"vocab size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB} "
            "(256 bytes + special tokens); pass e.g. 4096"
        )
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(text)) == text exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, even those absent from the training text, so nothing is unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out = Path(out_path)
    if out.is_dir():
        out = out / TOKENIZER_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json` (or a directory holding one)."""
    p = tokenizer_file(path)
    if not p.is_file():
        raise DataError(f"{p}: tokenizer file not found; pass the path of a tokenizer.json")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # the Rust side raises a bare Exception
        raise DataError(f"{p}: not a Hugging Face tokenizers file ({e})") from e


def fingerprint(path: str | Path) -> str:
    """sha256 (hex) of the tokenizer.json bytes: names the exact tokenizer a dataset was made with."""
    p = tokenizer_file(path)
    if not p.is_file():
        raise DataError(f"{p}: tokenizer file not found")
    return hashlib.sha256(p.read_bytes()).hexdigest()


def eod_id(tok: Tokenizer) -> int:
    """Id of the end-of-document token `<|endoftext|>`, which the loader puts after each document."""
    i = tok.token_to_id(EOD_TOKEN)
    if i is None:
        raise DataError(
            f"the tokenizer has no {EOD_TOKEN!r} token; hymoe separates documents with it — "
            "train one with `--train-tokenizer VOCAB` or add the token to your tokenizer"
        )
    return i


def vocab_size(tok: Tokenizer) -> int:
    """Number of ids the tokenizer can produce, special tokens included."""
    return tok.get_vocab_size(with_added_tokens=True)
