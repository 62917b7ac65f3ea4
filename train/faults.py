"""Fault injection for tests of the fault-tolerance paths (NaN guard, crash during save).

Set ``HYMOE_FAULTS`` to a comma-separated list of ``KIND@STEP``:
``nan_loss@5`` (the loss of step 5 becomes NaN on every rank), ``kill_in_save@4`` (the process
SIGKILLs itself in the middle of writing the step-4 checkpoint: shards written, not yet renamed),
``kill_in_async_save@4`` (with ``checkpoint.async_save``: the process SIGKILLs itself, and the
background writer, at the end of a later step while the step-4 save is still pending).
Unset in normal runs; reading it costs one dict lookup per step.
"""

from __future__ import annotations

import os
import signal

_PLAN: dict[str, set[int]] | None = None


def _plan() -> dict[str, set[int]]:
    global _PLAN
    if _PLAN is None:
        _PLAN = {}
        for item in filter(None, os.environ.get("HYMOE_FAULTS", "").split(",")):
            kind, _, step = item.partition("@")
            _PLAN.setdefault(kind.strip(), set()).add(int(step))
    return _PLAN


def due(kind: str, step: int) -> bool:
    return step in _plan().get(kind, ())


def kill_self() -> None:
    """SIGKILL this process and its children (the checkpoint writer's worker processes), as an
    out-of-memory killer or a node failure would."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:  # it exited between the listing and the kill
            pass
    os.kill(os.getpid(), signal.SIGKILL)
