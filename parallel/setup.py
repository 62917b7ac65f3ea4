"""Process groups: torch.distributed and megatron-core's parallel_state for a ParallelConfig."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from hymoe.parallel import cpu
from hymoe.parallel.layout import ParallelConfig


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(timeout_minutes: int = 30) -> tuple[int, int]:
    """Join the job's process group (torchrun/Slurm env vars) or make a world of one.

    Returns (rank, world_size). NCCL on GPUs, gloo on CPU.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        # A world of one needs no rendezvous: an in-memory store.
        dist.init_process_group(
            backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    return dist.get_rank(), dist.get_world_size()


def initialize_model_parallel(layout: ParallelConfig, seed: int) -> None:
    """Create megatron-core's TP/PP/EP/CP/DP groups and seed every RNG region from ``seed``."""
    cpu.activate()  # no-op with CUDA
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        # Set, it selects megatron's interleaved schedule (get_forward_backward_func).
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
