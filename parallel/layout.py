"""Parallel layout: how the world of ranks is split into TP × CP × DP × PP (and EP over TP·CP·DP).

Names and rules follow megatron-core, so a user can map ``parallel.*`` onto Megatron-LM flags:
tp ↔ --tensor-model-parallel-size, pp ↔ --pipeline-model-parallel-size, vpp ↔
--num-virtual-stages-per-pipeline-rank, ep ↔ --expert-model-parallel-size, cp ↔
--context-parallel-size, dp inferred from the world size.
Every impossible combination fails here, at start-up, with the field and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


class LayoutError(ValueError):
    pass


@dataclass
class ModelDims:
    """What the layout rules need to know of the model (``parallel`` does not import ``model``)."""

    num_layers: int
    stages: tuple[int, ...] = ()  # layers per '|'-separated stage, if the pattern has stage marks
    attention_heads: int = 0
    query_groups: int = 0
    mamba_heads: int = 0
    mamba_groups: int = 0
    num_experts: int = 0
    seq_len: int = 0  # training sequence length (context parallelism splits it in 2·cp chunks)
    ffn_hidden: int = 0  # dense MLP width ("-" layers), 0 if none
    moe_ffn_hidden: int = 0  # each routed expert's width
    shared_expert_hidden: int = 0  # the shared expert's width, 0 if none


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    # Virtual pipeline stages per pp rank (megatron's virtual_pipeline_model_parallel_size; 1: no
    # interleaving): each rank holds vpp model chunks, chunk v of rank r being virtual stage
    # v·pp + r.
    vpp: int = 1
    ep: int = 1
    # Tensor parallelism inside each expert (megatron's expert_tensor_parallel_size); null: tp when
    # ep = 1 (megatron's default), else 1 (whole experts, split over ep: experts are small).
    etp: Optional[int] = None
    cp: int = 1
    # Data-parallel size; null infers world_size / (tp·pp·cp).
    dp: Optional[int] = None
    # null: on when tp > 1 (megatron-core requires it for MoE with tp > 1).
    sequence_parallel: Optional[bool] = None
    distributed_optimizer: bool = False
    # MoE token dispatcher: alltoall (the one that scales with ep) or allgather.
    moe_dispatcher: str = "alltoall"

    @property
    def expert_tp(self) -> int:
        if self.etp is not None:
            return self.etp
        return self.tp if self.ep == 1 else 1

    @property
    def use_sequence_parallel(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else bool(self.sequence_parallel)

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp * self.cp)

    def validate(self, world_size: int, dims: ModelDims | None = None) -> int:
        """Check the layout for ``world_size`` ranks (and the model, if given); return dp."""

        def fail(field, msg):
            raise LayoutError(f"parallel.{field}: {msg}")

        for field in ("tp", "pp", "vpp", "ep", "cp"):
            v = getattr(self, field)
            if not isinstance(v, int) or v < 1:
                fail(field, f"must be a positive integer, got {v!r}")
        if self.vpp > 1 and self.pp == 1:
            fail("vpp", f"vpp={self.vpp} interleaves pipeline stages and needs pp > 1")
        if self.moe_dispatcher not in ("alltoall", "allgather"):
            fail("moe_dispatcher", f"must be alltoall or allgather, got {self.moe_dispatcher!r}")
        if dims is not None:
            # Model rules first: "tp=3 does not divide the heads" says more than a world-size clash.
            self._validate_model(dims, fail)
        mp = self.tp * self.pp * self.cp
        if world_size % mp:
            fail(
                "tp",
                f"world size {world_size} is not divisible by tp·pp·cp = "
                f"{self.tp}·{self.pp}·{self.cp} = {mp}; change the layout or the number of ranks",
            )
        dp = world_size // mp
        if self.dp is not None and self.dp != dp:
            fail("dp", f"{self.dp} ≠ world size {world_size} / (tp·pp·cp = {mp}) = {dp}")
        if self.etp is not None and (not isinstance(self.etp, int) or self.etp < 1):
            fail("etp", f"must be a positive integer or null, got {self.etp!r}")
        if (self.tp * self.cp * dp) % (self.expert_tp * self.ep):
            fail(
                "ep",
                f"etp·ep = {self.expert_tp}·{self.ep} must divide tp·cp·dp = {self.tp * self.cp * dp} "
                "(experts are laid out over the same ranks as tp, cp and dp)",
            )
        if self.sequence_parallel and self.tp == 1:
            fail("sequence_parallel", "needs tp > 1")
        return dp

    def _validate_model(self, d: ModelDims, fail) -> None:
        tp = self.tp
        if d.attention_heads:
            if d.attention_heads % tp:
                fail("tp", f"tp={tp} does not divide model.num_attention_heads={d.attention_heads}")
            # megatron-core (TransformerConfig, SelfAttention) accepts both ways round: tp ≤ groups
            # gives each rank whole KV groups; tp > groups (Nano: tp=8, 2 groups) all-gathers the
            # QKV output over TP and gives each rank the K/V of one group, shared by tp/groups
            # ranks. Plain megatron code, not Transformer Engine's: hymoe's local specs run it.
            if d.query_groups % tp and tp % d.query_groups:
                fail(
                    "tp",
                    f"tp={tp} and model.num_query_groups={d.query_groups}: one must divide the "
                    "other (megatron-core gives each TP rank whole KV groups, or, with more TP "
                    "ranks than groups, one group shared by tp/groups ranks)",
                )
        if d.mamba_heads:
            if d.mamba_heads % tp:
                fail("tp", f"tp={tp} does not divide model.mamba_num_heads={d.mamba_heads}")
            if d.mamba_groups % tp:
                fail("tp", f"tp={tp} does not divide model.mamba_num_groups={d.mamba_groups}")
            # Context parallelism in Mamba layers (megatron-core's MambaContextParallel) trades the
            # sequence shard for a head shard: each rank scans all tokens for heads/(tp·cp) heads,
            # and B/C groups are split over cp too, or repeated when there are fewer than cp.
            heads, groups = d.mamba_heads // tp, d.mamba_groups // tp
            if self.cp > 1 and heads % self.cp:
                fail(
                    "cp",
                    f"cp={self.cp} must divide the Mamba heads per TP rank, model.mamba_num_heads"
                    f"/tp = {d.mamba_heads}/{tp} = {heads} (each rank scans heads/(tp·cp) heads)",
                )
            if self.cp > 1 and groups % self.cp and self.cp % groups:
                fail(
                    "cp",
                    f"cp={self.cp} and the Mamba groups per TP rank, model.mamba_num_groups/tp = "
                    f"{d.mamba_groups}/{tp} = {groups}: one must divide the other",
                )
        # MLP widths are split over TP (experts over expert TP), whole columns per rank.
        if d.ffn_hidden and d.ffn_hidden % tp:
            fail("tp", f"tp={tp} does not divide model.ffn_hidden_size={d.ffn_hidden} (dense MLP layers)")
        if d.num_experts:
            if d.num_experts % self.ep:
                fail("ep", f"ep={self.ep} does not divide model.num_experts={d.num_experts}")
            if d.moe_ffn_hidden and d.moe_ffn_hidden % self.expert_tp:
                fail("etp", f"expert tensor parallel size {self.expert_tp} does not divide "
                            f"model.moe_ffn_hidden_size={d.moe_ffn_hidden}")
            if d.shared_expert_hidden and d.shared_expert_hidden % tp:
                fail("tp", f"tp={tp} does not divide model.moe_shared_expert_intermediate_size="
                           f"{d.shared_expert_hidden}")
            if tp > 1 and self.sequence_parallel is False:
                fail(
                    "sequence_parallel",
                    "MoE layers with tp > 1 need sequence parallel (megatron-core); remove the "
                    "override or set it to true",
                )
        elif self.ep > 1:
            fail("ep", f"ep={self.ep} but the model has no MoE layers")
        if d.stages and len(d.stages) > 1:
            if self.vpp > 1 and len(d.stages) != self.pp * self.vpp:
                fail(
                    "vpp",
                    f"the pattern has {len(d.stages)} '|'-separated stages but pp·vpp = "
                    f"{self.pp}·{self.vpp} = {self.pp * self.vpp} virtual stages; with vpp each "
                    "'|' part is one virtual stage",
                )
            if len(d.stages) != self.pp * self.vpp:
                fail(
                    "pp",
                    f"the pattern has {len(d.stages)} '|'-separated stages but pp={self.pp}",
                )
            if len(set(d.stages)) != 1:
                fail(
                    "pp",
                    f"stages of {list(d.stages)} layers: megatron-core's hybrid stack needs "
                    "equal stages; move the '|' marks",
                )
        if self.cp > 1 and d.seq_len and d.seq_len % (2 * self.cp):
            fail(
                "cp",
                f"train.seq_len={d.seq_len} must be divisible by 2·cp = {2 * self.cp} "
                "(load-balanced causal sharding gives each rank two chunks)",
            )
        if d.num_layers % self.pp:
            fail("pp", f"pp={self.pp} does not divide the {d.num_layers} layers of the pattern")
        if d.num_layers % (self.pp * self.vpp):
            fail(
                "vpp",
                f"pp·vpp = {self.pp}·{self.vpp} virtual stages do not divide the {d.num_layers} "
                f"layers of the pattern (each virtual stage needs the same number, at least one)",
            )

    def check_microbatches(self, num_microbatches: int) -> None:
        """megatron-core's interleaved schedule runs microbatches in groups of pp per virtual
        stage (``microbatch_group_size_per_vp_stage``, default pp) and refuses other counts."""
        if self.vpp > 1 and num_microbatches % self.pp:
            raise LayoutError(
                f"parallel.vpp: the interleaved schedule needs the microbatches per step, "
                f"global_batch/(micro_batch·dp) = {num_microbatches}, to be a multiple of "
                f"pp={self.pp}"
            )


def chunk_layers(num_layers: int, pp: int, vpp: int, pp_rank: int, vp_stage: int) -> range:
    """The model layers (0-based) of model chunk ``vp_stage`` on pipeline rank ``pp_rank``:
    virtual stage vp_stage·pp + pp_rank of pp·vpp equal ones — the placement megatron-core's
    interleaved schedule and its transformer layers (``get_transformer_layer_offset``) assume."""
    per_stage = num_layers // (pp * vpp)
    start = (vp_stage * pp + pp_rank) * per_stage
    return range(start, start + per_stage)
