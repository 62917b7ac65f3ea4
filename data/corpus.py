"""The demo corpus: the Python standard library's own `.py` sources.

Why these files: they are on every machine that can run hymoe (no download, works offline and in CI),
they are under the PSF license (clean to train on and to ship results from), and a few MB of real code
is enough for a tiny model to learn something visible in its loss curve. The selection depends only on
the Python version (3.11.x everywhere in CI), so the same recipe sees the same text on every machine.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

DEFAULT_MAX_BYTES = 6_000_000
# A hard ceiling so the demo stays a demo: the whole stdlib is ~11 MB and tokenizing it is the
# slowest part of the first run on a laptop.
MAX_BYTES_LIMIT = 10_000_000

# Regression tests are huge, repetitive and full of deliberately odd text; idlelib is a GUI app;
# site-packages holds third-party code (other licenses, differs per machine).
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})


def stdlib_root() -> Path:
    """The directory of this interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def demo_corpus_files(max_bytes: int = DEFAULT_MAX_BYTES) -> list[Path]:
    """Standard-library `.py` files, in sorted order, whose sizes add up to at most `max_bytes`.

    Files are taken in order of their path relative to the stdlib root (sorted as strings, so the
    order does not depend on the file system); a file that would overflow the budget is skipped and
    the walk goes on, so the budget is filled. Files that are not valid UTF-8 are skipped (each file
    becomes one document, and documents are UTF-8 text).
    """
    if not 0 < max_bytes <= MAX_BYTES_LIMIT:
        raise ValueError(
            f"max_bytes={max_bytes}: the demo corpus is capped at {MAX_BYTES_LIMIT} bytes; "
            "pass a value in (0, 10_000_000] or prepare your own text with `hymoe data prepare`"
        )
    root = stdlib_root()
    candidates: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending into skipped directories at all.
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rel = Path(dirpath).relative_to(root)
        candidates.extend((rel / f).as_posix() for f in filenames if f.endswith(".py"))

    chosen: list[Path] = []
    total = 0
    for rel in sorted(candidates):
        path = root / rel
        size = path.stat().st_size
        if size == 0 or total + size > max_bytes:
            continue
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        chosen.append(path)
        total += size
    return chosen


def heldout_corpus_files(train_max_bytes: int, max_bytes: int) -> list[Path]:
    """Standard-library `.py` files that `demo_corpus_files(train_max_bytes)` leaves out, chosen
    the same way up to `max_bytes`: held-out documents for the demo's validation loss."""
    train = set(demo_corpus_files(train_max_bytes))
    rest = [p for p in demo_corpus_files(MAX_BYTES_LIMIT) if p not in train]
    chosen, total = [], 0
    for path in rest:
        size = path.stat().st_size
        if total + size <= max_bytes:
            chosen.append(path)
            total += size
    return chosen
