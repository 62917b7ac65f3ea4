"""Reading in worker processes, without changing a single row.

Worker `w` of `W` owns the rank's streams at round-robin positions `p ≡ w (mod W)` and produces,
in order, exactly the rows the consumer will ask it for, one message per micro-batch that carries
its rows and the state of each of its streams *after* them. The consumer takes rows in schedule order and keeps, per stream, the last state
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

    i = -1
    try:
        sched = RowSchedule(*spec["schedule"])
        mine = [v for p, v in enumerate(sched.streams) if p % n_workers == w]
        streams = build_streams(mine, spec["datasets"], spec["blend"], spec["n_streams"],
                                spec["seed"], spec["on_corrupt"], states, spec["prefetch_threads"])
        B, S = sched.micro_batch, sched.seq_len
        i = 0
        while True:
            rows, touched = [], {}
            for j in range(i * B, (i + 1) * B):
                if sched.position(j) % n_workers == w:
                    v = sched.stream(j)
                    rows.append((j, *streams[v].next_row(S, sched.tokens_before(j))))
                    touched[v] = streams[v]
            if rows:  # one message per micro-batch: the rows, then each stream's state after them
                out.put(("batch", i, rows, {v: st.state_dict() for v, st in touched.items()}))
            i += 1
    except DataError as e:
        out.put(("error", i, str(e)))
    except BaseException:  # noqa: BLE001 - anything else is a bug; the consumer re-raises it
        out.put(("error", i, f"data worker {w} failed:\n{traceback.format_exc()}"))


class WorkerPool:
    """`n_workers` spawned processes producing a rank's rows, `queue_batches` micro-batches ahead."""

    def __init__(self, spec: dict, n_workers: int, states: dict, queue_batches: int):
        ctx = multiprocessing.get_context("spawn")
        self.n = n_workers
        from hymoe.data.stream import RowSchedule

        self.sched = RowSchedule(*spec["schedule"])
        self.queues = [ctx.Queue(maxsize=queue_batches) for _ in range(n_workers)]
        self.procs = [
            ctx.Process(target=_worker_main, args=(spec, w, n_workers, states, self.queues[w]),
                        name=f"hymoe-data-{w}", daemon=True)
            for w in range(n_workers)
        ]
        for p in self.procs:
            p.start()
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.queues)

    def get_batch(self, i: int) -> tuple[list[tuple[np.ndarray, int, list[int]]], dict[int, dict]]:
        """Micro-batch `i` (counted from the start of the pool): its rows as (window, dataset
        index, segment starts) in row order, and the state of each stream it touched, after its last row."""
        B = self.sched.micro_batch
        rows: dict[int, tuple[np.ndarray, int, list[int]]] = {}
        states: dict[int, dict] = {}
        for w in sorted({self.sched.position(j) % self.n for j in range(i * B, (i + 1) * B)}):
            msg = self._get(w)
            if msg[0] == "error":
                raise DataError(msg[2])
            _, got, items, st = msg
            if got != i:  # a logic error, never a data problem
                raise RuntimeError(f"data worker {w} sent micro-batch {got}, expected {i}")
            rows.update((j, (row, d, starts)) for j, row, d, starts in items)
            states.update(st)
        return [rows[j] for j in range(i * B, (i + 1) * B)], states

    def _get(self, worker: int) -> tuple:
        q, proc = self.queues[worker], self.procs[worker]
        while True:
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                if not proc.is_alive():
                    raise DataError(
                        f"data worker {worker} exited (code {proc.exitcode}) without a message: "
                        "its stderr says why; a killed worker (out of memory?) exits -9, and a "
                        "script that starts training must keep its code under "
                        "`if __name__ == '__main__':` (workers are spawned)") from None

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
