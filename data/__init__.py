"""Data: tokenize text to webdataset shards with a manifest, then stream blended, packed sequences.
Imports nothing else from hymoe; the trainer hands it its DP rank and world size."""

from hymoe.data.blend import Blend, Source
from hymoe.data.corpus import demo_corpus_files
from hymoe.data.errors import DataError
from hymoe.data.manifest import load_manifest
from hymoe.data.verify import verify
from hymoe.data.tokenizer import eod_id, fingerprint, load_tokenizer, train_bpe

__all__ = [
    "Blend", "DataError", "PackedStream", "Source", "build_stream", "demo_corpus_files", "eod_id",
    "fingerprint", "load_manifest", "load_tokenizer", "train_bpe", "verify",
]
# `prepare` is deliberately not re-exported: a function named like its module `hymoe.data.prepare`
# would shadow the module (`import hymoe.data.prepare as m` would give the function).
# Use `from hymoe.data.prepare import prepare`.


def __getattr__(name: str):
    # The loader imports torch (seconds); `prepare`'s spawned tokenizer workers and the loader's
    # reader workers should not pay that.
    if name in ("PackedStream", "build_stream"):
        from hymoe.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'hymoe.data' has no attribute {name!r}")
