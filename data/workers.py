"""Reading in worker processes, without changing a single row.

Worker `w` of `W` owns the rank's streams at round-robin positions `p ≡ w (mod W)` and produces,
in order, exactly the rows the consumer will ask it for; each row travels with its stream's state
*after* that row. The consumer takes rows in schedule order and keeps, per stream, the last state
it has received, so its `state_dict()` describes what the training loop got, never what a worker
merely read ahead. Rows are therefore identical for any `num_workers`, and a resume restarts the
workers from the consumer's states.

Workers are spawned (not forked: the trainer holds threads of torch, gloo and NCCL) and import
numpy and this package only, so one starts in a fraction of a second.
"""

from __future__ import annotations

import multiprocessing
import queue
import traceback
import weakref

import numpy as np
from hymoe.data.errors import DataError

_POLL_S = 1.0


def _worker_main(spec: dict, w: int, n_workers: int, states: dict, out) -> None:
    from hymoe.data.stream import RowSchedule, build_streams

    j = -1
    try:
        blend, datasets = spec["blend"], spec["datasets"]
        sched = RowSchedule(*spec["schedule"])
        mine = [v for p, v in enumerate(sched.streams) if p % n_workers == w]
        streams = build_streams(mine, datasets, blend, spec["n_streams"], spec["seed"],
                                spec["on_corrupt"], states)
        seq_len = sched.seq_len
        j = 0
        while True:
            if sched.position(j) % n_workers == w:
                v = sched.stream(j)
                row, d = streams[v].next_row(seq_len, sched.tokens_before(j))
                out.put(("row", j, row, d, streams[v].state_dict()))
            j += 1
    except DataError as e:
        out.put(("error", j, str(e)))
    except BaseException:  # noqa: BLE001 - anything else is a bug; the consumer re-raises it
        out.put(("error", j, f"data worker {w} failed:\n{traceback.format_exc()}"))


class WorkerPool:
    """`n_workers` spawned processes producing a rank's rows; `get(j)` returns row `j`."""

    def __init__(self, spec: dict, n_workers: int, states: dict, queue_rows: int):
        ctx = multiprocessing.get_context("spawn")
        self.n = n_workers
        self.sched = spec["schedule"]
        self.queues = [ctx.Queue(maxsize=queue_rows) for _ in range(n_workers)]
        self.procs = [
            ctx.Process(target=_worker_main, args=(spec, w, n_workers, states, self.queues[w]),
                        name=f"hymoe-data-{w}", daemon=True)
            for w in range(n_workers)
        ]
        for p in self.procs:
            p.start()
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.queues)

    def get(self, j: int, worker: int) -> tuple[np.ndarray, int, dict]:
        """Row `j` from `worker`: (window, dataset index, its stream's state after it)."""
        q, proc = self.queues[worker], self.procs[worker]
        while True:
            try:
                msg = q.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not proc.is_alive():
                    raise DataError(
                        f"data worker {worker} exited (code {proc.exitcode}) without a message: "
                        "its stderr says why; a killed worker (out of memory?) exits -9, and a "
                        "script that starts training must keep its code under "
                        "`if __name__ == '__main__':` (workers are spawned)") from None
        if msg[0] == "error":
            raise DataError(msg[2])
        _, got, row, d, state = msg
        if got != j:  # a logic error, never a data problem
            raise RuntimeError(f"data worker {worker} sent row {got}, expected {j}")
        return row, d, state

    def close(self) -> None:
        self._finalizer()


def _shutdown(procs, queues) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
    for q in queues:
        q.cancel_join_thread()
        q.close()
