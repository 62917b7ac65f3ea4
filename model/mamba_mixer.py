"""The Mamba-2 mixer as a megatron-core module, runnable without mamba-ssm or causal-conv1d.

Parameter names, shapes and TP sharding follow megatron-core's ``MambaMixer`` (and so its
checkpoints and Hugging Face ``nemotron_h``): ``in_proj`` (column-parallel, producing z, x, B, C, dt),
depthwise ``conv1d`` over x, B, C; per-head ``A_log``, ``D``, ``dt_bias`` (kept in fp32); grouped
gated RMSNorm ``norm``; ``out_proj`` (row-parallel). Heads and groups shard over TP.

The conv and the scan go through ``hymoe.model.ssd_kernels``: mamba-ssm's Triton SSD and
causal-conv1d's kernel on CUDA when installed; otherwise (CPU always) hymoe's own chunked SSD in
PyTorch (``hymoe.model.ssd``), which is the reference the fast path is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
from torch import nn

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.ssm.mamba_context_parallel import MambaContextParallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from hymoe.model import ssd, ssd_kernels


@dataclass
class MambaMixerSubmodules:
    in_proj: Union[ModuleSpec, type] = None
    out_proj: Union[ModuleSpec, type] = None


class GatedRMSNorm(nn.Module):
    """rmsnorm(y * silu(z)) * weight with one RMS statistic per group of channels (fp32 stats)."""

    def __init__(self, hidden: int, group_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype))
        setattr(self.weight, "tensor_model_parallel", True)
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ssd.gated_rms_norm(y, z, self.weight, eps=self.eps, group_size=self.group_size)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets
        )


class MambaMixer(MegatronModule):
    """Mamba-2 mixer. Input/output ``[s, b, h]`` (s is the local sequence under sequence parallel)."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MambaMixerSubmodules,
        d_model: int,
        d_conv: int = 4,
        A_init_range=(1, 16),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit=(0.0, float("inf")),
        layer_number: Optional[int] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        pp_layer_offset: int = 0,
    ):
        super().__init__(config)
        assert pg_collection is not None
        self.layer_number = layer_number
        self.d_state = config.mamba_state_dim
        self.headdim = config.mamba_head_dim
        self.ngroups = config.mamba_num_groups
        self.nheads = config.mamba_num_heads
        self.d_inner = self.nheads * self.headdim
        self.chunk_size = getattr(config, "hymoe_mamba_chunk_size", 128)
        # A lower clamp on dt only where a checkpoint's convention has one (HF nemotron_h).
        self.dt_limit = getattr(config, "hymoe_mamba_dt_limit", dt_limit)
        tp = pg_collection.tp.size()
        # Validated with a friendlier message in hymoe.parallel.layout; these guard direct use.
        assert self.nheads % tp == 0 and self.ngroups % tp == 0 and self.nheads % self.ngroups == 0
        self.nheads_local = self.nheads // tp
        self.ngroups_local = self.ngroups // tp
        self.d_inner_local = self.d_inner // tp
        self.tp_group = pg_collection.tp

        self.in_proj = build_module(
            submodules.in_proj,
            d_model,
            2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads,  # z x B C dt
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="fc1",
            tp_group=pg_collection.tp,
        )
        conv_dim = self.d_inner_local + 2 * self.ngroups_local * self.d_state
        with get_cuda_rng_tracker().fork():
            self.conv1d = nn.Conv1d(
                conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim, padding=d_conv - 1,
                bias=True, dtype=config.params_dtype,
            )
            nn.init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
            # softplus(dt_bias) log-uniform in [dt_min, dt_max], the Mamba-2 initialisation.
            dt = torch.exp(
                torch.rand(self.nheads_local) * (math.log(dt_max) - math.log(dt_min))
                + math.log(dt_min)
            ).clamp(min=dt_init_floor)
            # A_log, D and dt_bias stay fp32 whatever the training precision (decay rates are
            # exponentiated; low precision there changes the memory horizon of every head).
            self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).float())
            self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads_local).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(self.nheads_local))
        for p in (self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log, self.D):
            setattr(p, "tensor_model_parallel", True)
            setattr(p, "partition_dim", 0)
        self.norm = GatedRMSNorm(
            self.d_inner_local, self.d_inner_local // self.ngroups_local, config.layernorm_epsilon,
            config.params_dtype,
        )
        self.cp = MambaContextParallel(
            cp_group=pg_collection.cp, d_inner_local_tp=self.d_inner_local,
            nheads_local_tp=self.nheads_local, ngroups_local_tp=self.ngroups_local,
            d_state=self.d_state, conv1d_cp1=self.conv1d, dt_bias_cp1=self.dt_bias,
            A_log_cp1=self.A_log, D_cp1=self.D, D_has_hdim=False,
        )
        self.out_proj = build_module(
            submodules.out_proj,
            self.d_inner,
            d_model,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="fc2",
            tp_group=pg_collection.tp,
        )

    def forward(self, hidden_states, inference_context=None, *, packed_seq_params=None, seq_idx=None):
        """hidden_states [s, b, h] → (out [s, b, h], bias None). ``seq_idx`` int [b, S] (the whole
        sequence, in order) resets the conv and scan state at document boundaries; megatron's
        layers cannot pass it down, so ``HybridModel`` sets ``self.seq_idx`` before each forward.

        Under context parallelism the scan needs the whole sequence: ``self.cp`` (megatron-core's
        MambaContextParallel) trades the sequence shard for a head shard before the conv and
        back after the scan, so each CP rank scans all S tokens for nheads/cp heads. At cp = 1 it
        is the identity and its parameter views are the parameters themselves."""
        if seq_idx is None:
            seq_idx = getattr(self, "seq_idx", None)
        cp = self.cp
        zxbcdt, _ = self.in_proj(hidden_states)  # [s, b, local], full local sequence after SP gather
        zxbcdt = cp.pre_conv_ssm(zxbcdt).transpose(0, 1)  # [b, S, local/cp]; kernels are batch-first
        d_inner, ngroups, nheads = cp.d_inner_local_tpcp, cp.ngroups_local_tpcp, cp.nheads_local_tpcp
        z, xbc, dt = torch.split(
            zxbcdt, [d_inner, d_inner + 2 * ngroups * self.d_state, nheads], dim=-1
        )
        xbc = ssd_kernels.causal_conv1d(
            xbc, cp.get_conv1d_weight().squeeze(1), cp.get_conv1d_bias(), seq_idx=seq_idx,
            activation="silu",
        )
        x, B, C = torch.split(xbc, [d_inner, ngroups * self.d_state, ngroups * self.d_state], dim=-1)
        b, s = x.shape[:2]
        y = ssd_kernels.ssd_chunk_scan(
            x.reshape(b, s, nheads, self.headdim),
            dt,
            -torch.exp(cp.get_A_log().float()),
            B.reshape(b, s, ngroups, self.d_state),
            C.reshape(b, s, ngroups, self.d_state),
            chunk_size=self.chunk_size,
            D=cp.get_D(),
            dt_bias=cp.get_dt_bias(),
            dt_softplus=True,
            dt_limit=self.dt_limit,
            seq_idx=seq_idx,
        )
        # Back to the sequence shard before the norm: its groups span heads of several CP ranks.
        y = cp.post_conv_ssm(y.reshape(b, s, d_inner).transpose(0, 1))
        z = cp.post_conv_ssm(z.transpose(0, 1).contiguous())
        y = self.norm(y.transpose(0, 1), z.transpose(0, 1))
        out, out_bias = self.out_proj(y.transpose(0, 1).contiguous())
        return out, out_bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """TP-sharded, with in_proj and conv1d split into their z/x/B/C/dt parts so that a
        checkpoint can be loaded under another TP size (the parts interleave differently)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sd = {}
        self._save_to_state_dict(sd, "", keep_vars=True)
        sd = make_sharded_tensors_for_checkpoint(
            sd, prefix, {"A_log": 0, "dt_bias": 0, "D": 0}, sharded_offsets
        )
        for name, module in self.named_children():
            if name == "conv1d":
                msd = make_sharded_tensors_for_checkpoint(
                    module.state_dict(prefix="", keep_vars=True), f"{prefix}{name}.",
                    {"weight": 0, "bias": 0}, sharded_offsets,
                    tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
                )
            else:
                msd = sharded_state_dict_default(
                    module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group
                )
            sd.update(msd)
        n = self.ngroups_local * self.d_state
        sd[f"{prefix}in_proj.weight"] = _split_tensor_factory(
            sd[f"{prefix}in_proj.weight"],
            [self.d_inner_local, self.d_inner_local, n, n, self.nheads_local],
            ["z", "x", "B", "C", "dt"], 0,
        )
        for key in ("conv1d.weight", "conv1d.bias"):
            sd[f"{prefix}{key}"] = _split_tensor_factory(
                sd[f"{prefix}{key}"], [self.d_inner_local, n, n], ["x", "B", "C"], 0
            )
        return sd


def _split_tensor_factory(sh_ten: ShardedTensor, sections, names, dim: int) -> ShardedTensorFactory:
    """Save one fused TP-local tensor as independent named parts (``key.z``, ``key.x``, ...).

    (megatron-core has the same helper in ``ssm.mamba_mixer``, but that module imports triton.)
    Each part is TP-sharded on its own, so a checkpoint written at one TP size loads at another.
    """
    template = sh_ten.without_data()
    assert sum(sections) == template.local_shape[dim]

    @torch.no_grad()
    def build(key, t, replica_id, flattened_range):
        whole = replace(
            template, key=key, data=t, dtype=t.dtype, replica_id=replica_id,
            flattened_range=flattened_range,
        )
        parts, start = [], 0
        for size, name in zip(sections, names):
            for part in whole.narrow(dim, start, size):
                part.key = f"{part.key}.{name}"
                parts.append(part)
            start += size
        return parts

    @torch.no_grad()
    def merge(parts):
        return torch.cat(parts)

    return ShardedTensorFactory(sh_ten.key, sh_ten.data, build, merge, sh_ten.replica_id)
