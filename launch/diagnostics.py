"""Start-up diagnostics, printed by rank 0 before the model is built: what a failed or slow
multi-node start is debugged with. The layout against the world size, the rendezvous / NCCL /
Slurm environment, the GPU (or CPU), library versions and the precision backend.

``hymoe train`` calls ``print_startup`` for every run, whoever launched it (torchrun, Slurm, a
plain process); it reads the launcher's environment variables, not torch.distributed, which is
not yet initialised then.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform

# Environment variables that decide how ranks find each other and talk.
ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "GLOO_", "UCX_", "FI_", "NVTE_")
ENV_NAMES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
             "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_MAX_CONNECTIONS", "OMP_NUM_THREADS")
SLURM_NAMES = ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_PARTITION", "SLURM_JOB_ACCOUNT",
               "SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE",
               "SLURM_GPUS_PER_NODE", "SLURM_CPUS_PER_TASK", "SLURM_RESTART_COUNT")
PACKAGES = ("hymoe", "torch", "megatron-core", "transformer-engine",
            "mamba-ssm", "causal-conv1d")


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def layout_line(cfg, world_size: int) -> str:
    """``world W = dp·tp·pp·cp`` with the sizes, or the reason this world cannot run the layout."""
    from hymoe.train.config import model_dims

    p = cfg.parallel
    try:
        dp = p.validate(world_size, model_dims(cfg.model, cfg.train.seq_len))
    except ValueError as e:
        return f"✗ world size {world_size}: {e}"
    vpp = f" ({p.vpp} virtual stages each)" if p.vpp > 1 else ""
    return (f"world {world_size} = dp {dp} × tp {p.tp} × pp {p.pp}{vpp} × cp {p.cp}; "
            f"ep {p.ep} (expert tp {p.expert_tp})")


def device_line(local_world: int | None) -> str:
    """The GPU model, compute capability and count — or ``cpu`` — plus a check that this node has
    a GPU for each of its processes."""
    import torch

    if not torch.cuda.is_available():
        return f"cpu ({os.cpu_count()} cores), gloo; {platform.machine()}"
    n = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    try:  # a tuple in recent torch, an int in older releases; absent in builds without NCCL
        v = torch.cuda.nccl.version()
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except (AttributeError, RuntimeError):
        nccl = "none"
    line = (f"{n}× {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB), "
            f"CUDA {torch.version.cuda}, NCCL {nccl}")
    if local_world and local_world > n:
        line += f"  ✗ {local_world} processes on this node but {n} GPUs visible"
    return line


def backend_line(cfg) -> str:
    from hymoe.precision.backend import select_backend

    try:
        choice = select_backend(cfg.precision)
    except ValueError as e:
        return f"✗ {e}"
    return f"{cfg.precision.recipe} → {choice.backend} ({choice.reason})"


def environment_lines(env=None) -> list[str]:
    env = os.environ if env is None else env
    keys = [k for k in ENV_NAMES + SLURM_NAMES if k in env]
    keys += sorted(k for k in env if k.startswith(ENV_PREFIXES))
    return [f"{k}={env[k]}" for k in keys]


def report(cfg, env=None) -> str:
    """The diagnostics block (several lines) for ``cfg`` in this process's environment."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", 1))
    local = env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    versions = ", ".join(f"{p} {v}" for p in PACKAGES if (v := _version(p)))
    lines = [
        "── start-up diagnostics (rank 0) " + "─" * 40,
        f"host      {platform.node()} · python {platform.python_version()}",
        f"layout    {layout_line(cfg, world)}",
        f"device    {device_line(int(local) if str(local).isdigit() else None)}",
        f"versions  {versions}",
        f"precision {backend_line(cfg)}",
        "env       " + ("\n          ".join(environment_lines(env)) or "(no launcher variables: one process)"),
    ]
    return "\n".join(lines)


def print_startup(cfg) -> None:
    """Print ``report`` on rank 0 (RANK unset counts as rank 0); other ranks print nothing."""
    if os.environ.get("RANK", "0") != "0":
        return
    try:
        text = report(cfg)
    except Exception as e:  # noqa: BLE001 - a report that cannot be made must not stop the run
        text = f"start-up diagnostics failed: {type(e).__name__}: {e}"
    print(text, flush=True)
