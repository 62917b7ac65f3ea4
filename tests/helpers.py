"""Shared test helpers: launching torchrun workers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, nproc: int, *args: str, timeout: int = 600, cwd=None) -> subprocess.CompletedProcess:
    """Run ``script`` under torchrun with ``nproc`` CPU processes over gloo; raise with its output on failure."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(script), *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script.name} {' '.join(args)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def hymoe(*args: str, cwd=None, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the `hymoe` command as a user would (a fresh process), capturing its output."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run([sys.executable, "-m", "hymoe", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=full_env)


def hymoe_torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m hymoe ARGS` on CPU (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "hymoe", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
