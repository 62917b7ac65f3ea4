"""The progress bar of the data commands (`prepare`, `verify`): bytes done of a total, on stderr."""

from __future__ import annotations


def byte_progress(enabled: bool, total: int, description: str):
    """(rich Progress, its task) counting `total` bytes, or None when not `enabled`; the caller
    starts and stops it."""
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=False)
    return bar, bar.add_task(description, total=total)
