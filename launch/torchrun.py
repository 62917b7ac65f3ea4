"""torchrun: ``python -m torch.distributed.run ... -m hymoe train RECIPE OVERRIDES`` on this node.

One node: rendezvous on 127.0.0.1 at a free port. Several nodes: the same command on each node with
its ``--node-rank``; node 0's ``--rdzv-endpoint`` host:port is the master (static rendezvous, so
ranks 0..N-1 sit on node 0 in order, as on Slurm).
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import sys

from hymoe.launch.job import Job


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(job: Job, nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
            rdzv_endpoint: str | None = None, python: str = sys.executable) -> list[str]:
    """The torchrun command line for ``job``."""
    if rdzv_endpoint:
        host, _, port = rdzv_endpoint.rpartition(":")
    else:
        host, port = "127.0.0.1", str(free_port())
    signals = ["--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"] if handles_usr1() else []
    return [
        python, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
        f"--master-addr={host}", f"--master-port={port}", *signals,
        "-m", "hymoe", *job.train_argv(),
    ]


@functools.cache
def handles_usr1() -> bool:
    """Whether this torch's torchrun can forward SIGUSR1 to its workers (``--signals-to-handle``,
    newer releases); older ones die of it and leave the workers behind."""
    import dataclasses

    from torch.distributed.launcher.api import LaunchConfig

    return any(f.name == "signals_to_handle" for f in dataclasses.fields(LaunchConfig))


def signal_for_workers(signum: int) -> int:
    """The signal to pass to torchrun for one the launcher received: USR1 (a preemption warning)
    as it is where torchrun forwards it, else TERM — the trainer saves and stops on either."""
    if signum == signal.SIGUSR1 and not handles_usr1():
        return signal.SIGTERM
    return signum


def environment() -> dict:
    """The workers' environment: this one, with one OpenMP thread per rank unless set (torchrun's
    own default, without its warning), and megatron-core's import-time warnings silenced."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env
