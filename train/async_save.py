"""Asynchronous checkpoint saves (``checkpoint.async_save``, Megatron-LM's ``--async-save``).

megatron-core's dist-checkpointing splits a save into a plan (collective, in the training
process), a write (``AsyncRequest.async_fn``: no collectives, any process) and finalize functions
(collective, after every rank's write is done). :func:`hymoe.train.checkpoint.save` does the plan
and returns at once; this queue runs the write in a **forked** process (megatron's
``TemporalAsyncCaller``) and the finalization — metadata, checksums, rename, ``latest`` — when a
poll finds every rank's writer done.

Why the fork is what makes it correct: the write buckets hold the live parameter and optimizer
tensors (on CPU, megatron's "copy to host" is ``tensor.to("cpu")``, which returns the tensor
itself; on GPU it is a host copy). The child is forked after them and before the next optimizer
step, so it writes a copy-on-write snapshot of step N whatever the trainer does next. A spawned
persistent worker (megatron's ``PersistentAsyncCaller``) would receive CPU tensors through shared
memory instead and race with the next step, so hymoe never uses it.

At most one save is in flight: scheduling another waits for the pending one first.
"""

from __future__ import annotations

from pathlib import Path

from hymoe.train import faults


class AsyncCheckpointQueue:
    """The pending background checkpoint save of this rank. Every method is collective (one
    all-reduce at least): call it on every rank at the same point of the loop."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._calls = AsyncCallsQueue(persistent=False)
        self.pending: Path | None = None
        self.pending_step: int | None = None

    def schedule(self, request, path: Path, step: int) -> None:
        """Start writing ``request`` (megatron's AsyncRequest, its finalize functions attached)
        in a forked process; ``path`` and ``step`` name the checkpoint for messages and faults."""
        self.wait()
        self._calls.schedule_async_request(request)
        self.pending, self.pending_step = path, step

    def poll(self) -> Path | None:
        """Finalize the pending save if every rank's writer has finished; return its path then,
        else None. Costs one all-reduce while a save is pending, nothing otherwise."""
        if self.pending is None:
            return None
        if faults.due("kill_in_async_save", self.pending_step):
            faults.kill_self()
        if not self._calls.maybe_finalize_async_calls(blocking=False):
            return None
        return self._done()

    def wait(self) -> Path | None:
        """Block until the pending save (if any) is written and finalized; return its path."""
        if self.pending is None:
            return None
        self._calls.maybe_finalize_async_calls(blocking=True)
        return self._done()

    def abort(self) -> None:
        """After a failure (other ranks may be gone, so nothing collective): stop the writer and
        its worker processes. The checkpoint stays a ``*.tmp`` folder; ``latest`` still names
        the previous one."""
        import psutil

        for call in self._calls.async_calls:
            process = getattr(call.async_caller, "process", None)
            if process is not None and process.pid is not None:
                try:
                    tree = psutil.Process(process.pid)
                    for p in tree.children(recursive=True) + [tree]:
                        p.kill()
                except psutil.NoSuchProcess:
                    pass
                process.join()
                call.async_caller.process = None
        self._calls.async_calls.clear()
        self.pending = self.pending_step = None

    def _done(self) -> Path:
        path, self.pending, self.pending_step = self.pending, None, None
        return path
