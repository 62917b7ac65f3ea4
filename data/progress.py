"""The progress bars of long commands (`data prepare`, `data verify`, `convert to-hf`), on stderr."""

from __future__ import annotations


def byte_progress(enabled: bool, total: int, description: str):
    """(rich Progress, its task) counting `total` bytes, or None when not `enabled`; the caller
    starts and stops it."""
    if not enabled:
        return None
    from rich.progress import DownloadColumn

    return _progress(DownloadColumn(), total, description)


def count_progress(enabled: bool, total: int, description: str):
    """The same, counting `total` items (shown as done/total)."""
    if not enabled:
        return None
    from rich.progress import MofNCompleteColumn

    return _progress(MofNCompleteColumn(), total, description)


def _progress(counter, total: int, description: str):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), counter,
                   TimeRemainingColumn(), console=Console(stderr=True), transient=False)
    return bar, bar.add_task(description, total=total)
