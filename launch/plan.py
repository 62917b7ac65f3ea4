"""The layout planner behind ``hymoe plan``: every way to lay a recipe's model over N GPUs that
passes hymoe's layout rules (``ParallelConfig.validate``, the same check ``hymoe train`` runs),
with per-GPU memory (``hymoe.launch.memory``) and estimated step time and MFU
(``hymoe.launch.step_time``), ranked: layouts that fit with headroom first, fastest first.

Searched: tp (1, 2, 4, 8: TP beyond one NVLink board never pays), cp and ep (powers of two,
respectively divisors of the expert count), etp (1 or tp), pp (divisors of the layer count up to
16), and per layout the micro batch (1, 2, 4, 8) and recompute choice that run fastest within
memory. Decided, not searched: sequence parallelism is on with tp > 1 (megatron-core requires it
for MoE, and it only saves memory); the distributed optimizer is on whenever there is data
parallelism (its reduce-scatter + all-gather move what an all-reduce moves, and it shards the
optimizer state). Not searched: virtual pipeline stages (hymoe's hybrid stack runs them,
``parallel.vpp``); a ``parallel.vpp=V`` override lays every candidate out with V interleaved
stages per rank (layouts whose layers do not split into pp·V equal stages are refused).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field

from hymoe.launch.hardware import GPU
from hymoe.launch.memory import (
    GB,
    RECOMPUTE,
    all_stage_params,
    model_table,
    padded_vocab,
    stage_layers,
    stage_memory,
)
from hymoe.launch.step_time import layer_time, output_time, step_time
from hymoe.model.flops import flops_breakdown, flops_per_token, layer_flops_by_module
from hymoe.parallel.layout import LayoutError, ParallelConfig
from hymoe.train.config import HymoeConfig, model_dims

# A layout fits when its peak is under this share of the GPU's memory (allocator fragmentation,
# imbalance the model does not see).
HEADROOM = 0.9
TP_CHOICES = (1, 2, 4, 8)
MICRO_BATCHES = (1, 2, 4, 8)
MAX_PP = 16
# How megatron-core 0.16.1 spells each recompute choice (TransformerConfig fields).
RECOMPUTE_FLAGS = {
    "none": "",
    "selective": "recompute_granularity=selective recompute_modules=[layernorm,moe_act]",
    "moe": "recompute_granularity=selective recompute_modules=[layernorm,moe]",
}
# ... and hymoe's recipe keys for it (None: megatron's layernorm and moe_act recompute need
# Transformer Engine layers and grouped GEMM, which hymoe's layers do not use yet).
RECOMPUTE_OVERRIDES = {
    "none": "",
    "selective": None,
    "moe": "train.recompute=selective train.recompute_modules=[moe]",
}


@dataclass
class Plan:
    layout: ParallelConfig
    dp: int
    micro_batch: int
    num_micro: int
    recompute: str
    memory: dict  # the stage with the most bytes
    time: dict
    mfu: float  # of the peak the model's format mix allows
    mfu_bf16: float  # of the dense BF16 peak (what metrics.jsonl reports)
    tflops: float  # model TFLOP/s per GPU
    fits: bool
    notes: list[str] = field(default_factory=list)

    @property
    def overrides(self) -> str:
        p = self.layout
        out = [f"parallel.tp={p.tp}", f"parallel.pp={p.pp}"]
        out += [f"parallel.vpp={p.vpp}"] if p.vpp > 1 else []
        out += [f"parallel.cp={p.cp}", f"parallel.ep={p.ep}", f"parallel.etp={p.expert_tp}",
                f"parallel.distributed_optimizer={str(p.distributed_optimizer).lower()}",
                f"train.micro_batch={self.micro_batch}"]
        if RECOMPUTE_OVERRIDES[self.recompute]:
            out.append(RECOMPUTE_OVERRIDES[self.recompute])
        return " ".join(out)

    def key(self) -> tuple:
        p = self.layout
        return (p.tp, p.cp, p.ep, p.expert_tp, p.pp)

    def to_json(self) -> dict:
        p = self.layout
        return {
            "tp": p.tp, "pp": p.pp, "vpp": p.vpp, "cp": p.cp, "ep": p.ep, "etp": p.expert_tp,
            "dp": self.dp,
            "sequence_parallel": p.use_sequence_parallel,
            "distributed_optimizer": p.distributed_optimizer, "micro_batch": self.micro_batch,
            "num_microbatches": self.num_micro, "recompute": self.recompute,
            "recompute_megatron": RECOMPUTE_FLAGS[self.recompute], "fits": self.fits,
            "memory_gb": {k: v / GB for k, v in self.memory.items()
                           if k not in ("in_flight", "dense_params", "expert_params")},
            "in_flight_microbatches": self.memory["in_flight"],
            "step_s": self.time["step"],
            "time_s": {k: v for k, v in self.time.items() if k != "step"},
            "mfu": self.mfu, "mfu_bf16": self.mfu_bf16, "tflops_per_gpu": self.tflops,
            "overrides": self.overrides, "notes": self.notes,
        }


@dataclass
class PlanResult:
    plans: list[Plan]  # ranked
    rejected: Counter  # reason → layouts the rules refused
    context: dict


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(int(math.log2(limit)) + 1)]


def candidate_layouts(cfg: HymoeConfig, world: int, seq_len: int, rejected: Counter):
    """(ParallelConfig, dp) for every layout the rules accept."""
    dims = model_dims(cfg.model, seq_len)
    experts = dims.num_experts
    eps = [e for e in range(1, experts + 1) if experts % e == 0] if experts else [1]
    pps = [p for p in range(1, min(dims.num_layers, MAX_PP) + 1) if dims.num_layers % p == 0]
    for tp in TP_CHOICES:
        for cp in _powers_of_two(world):
            for pp in pps:
                if world % (tp * cp * pp):
                    continue
                for ep in eps:
                    for etp in sorted({1, tp}):
                        layout = ParallelConfig(tp=tp, pp=pp, vpp=cfg.parallel.vpp, ep=ep,
                                                etp=etp, cp=cp)
                        try:
                            dp = layout.validate(world, dims)
                        except LayoutError as e:
                            rejected[str(e).split(":")[0]] += 1
                            continue
                        edp = tp * cp * dp // (etp * ep)
                        layout.distributed_optimizer = dp * cp > 1 or edp > 1
                        yield layout, dp


def _stage_groups(cfg, pp: int, formats, vpp: int = 1) -> list[Counter]:
    """Each stage's layers as a count of (symbol, formats) kinds, so that every kind of layer is
    costed once per layout."""
    out = []
    for stage in stage_layers(cfg.model, pp, vpp):
        out.append(Counter((s, tuple(sorted(formats[i].items()))) for i, s in stage))
    return out


def evaluate(cfg: HymoeConfig, layout: ParallelConfig, dp: int, micro_batch: int, recompute: str,
             gpu: GPU, seq_len: int, global_batch: int, vocab: int, table: dict, params: list,
             groups: list, model_flops_per_gpu_step: float, mixed_peak: float,
             cache: dict) -> Plan:
    model = cfg.model
    num_micro = global_batch // (micro_batch * dp)
    tokens = seq_len // layout.cp * micro_batch
    native = gpu.mx_formats
    stages = stage_memory(model, layout, dp, seq_len, micro_batch, num_micro, vocab,
                          cfg.precision, recompute, native_quantized=native, table=table,
                          params=params)
    worst = max(stages, key=lambda m: m["total"])
    stage_times, stage_comm = [], []
    for r, kinds in enumerate(groups):
        t, comm = 0.0, Counter()
        for (symbol, fmts), count in kinds.items():
            key = (symbol, fmts, tokens, layout.tp, layout.cp, layout.ep, layout.expert_tp,
                   recompute)
            if key not in cache:  # the same layer kind recurs across stages and layouts
                cache[key] = layer_time(model, symbol, dict(fmts), seq_len, tokens, layout,
                                        recompute, gpu)
            lt = cache[key]
            t += count * sum(lt.values())
            comm.update({k: count * lt[k] for k in ("tp", "ep", "cp")})
        if r == len(groups) - 1:
            t += output_time(model, padded_vocab(vocab, layout.tp), tokens, layout, gpu)
        stage_times.append(t)
        stage_comm.append(comm)
    comm = stage_comm[stage_times.index(max(stage_times))]
    edp = layout.tp * layout.cp * dp // (layout.expert_tp * layout.ep)
    opt_params = (worst["dense_params"] / (dp * layout.cp if layout.distributed_optimizer else 1)
                  + worst["expert_params"] / (edp if layout.distributed_optimizer else 1))
    t = step_time(stage_times, [s / 3 for s in stage_times], layout, dp, num_micro,
                  worst["dense_params"], worst["expert_params"], opt_params, tokens,
                  model.hidden_size, gpu)
    slots = num_micro + (layout.pp - 1) / layout.vpp  # as step_time counts them
    t.update({k: slots * v for k, v in comm.items()})
    achieved = model_flops_per_gpu_step / t["step"]
    fits = worst["total"] <= HEADROOM * gpu.memory_gb * 1e9
    return Plan(layout, dp, micro_batch, num_micro, recompute, worst, t,
                mfu=achieved / mixed_peak, mfu_bf16=achieved / (gpu.bf16_tflops * 1e12),
                tflops=achieved / 1e12, fits=fits)


def _schedulable(layout: ParallelConfig, num_micro: int) -> bool:
    try:
        layout.check_microbatches(num_micro)
    except LayoutError:
        return False
    return True


def _mixed_peak(cfg: HymoeConfig, formats, seq_len: int, vocab: int, gpu: GPU) -> float:
    """FLOP/s one GPU would reach running every module at its format's full peak."""
    seconds = flops = 0.0
    for i, s in enumerate(cfg.model.layer_pattern):
        for name, f in layer_flops_by_module(cfg.model, s, seq_len).items():
            seconds += f / (gpu.peak_tflops(formats[i].get(name, "bf16")) * 1e12)
            flops += f
    logits = 2.0 * cfg.model.hidden_size * vocab
    return (flops + logits) / (seconds + logits / (gpu.bf16_tflops * 1e12))


def plan(cfg: HymoeConfig, world: int, gpu: GPU) -> PlanResult:
    """Every layout of ``cfg``'s model on ``world`` GPUs of type ``gpu``, at ``cfg.train.seq_len``
    and ``cfg.train.global_batch``, ranked (fits first, then estimated step time)."""
    from hymoe.train.inspect import _vocab

    seq_len, global_batch = cfg.train.seq_len, cfg.train.global_batch
    vocab = _vocab(cfg)
    table = model_table(cfg.model, cfg.precision)
    formats = table["formats"]
    depths = cfg.model.mtp_depths
    per_token = flops_per_token(cfg.model, seq_len, vocab, mtp_depths=len(depths),
                                mtp_pattern=depths[0] if depths else "*E")
    model_flops = per_token * global_batch * seq_len / world
    mixed_peak = _mixed_peak(cfg, formats, seq_len, vocab, gpu)
    rejected: Counter = Counter()
    best: list[Plan] = []
    cache: dict = {}
    for layout, dp in candidate_layouts(cfg, world, seq_len, rejected):
        micro = [b for b in MICRO_BATCHES if global_batch % (b * dp) == 0]
        if not micro:
            rejected[f"train.global_batch ({global_batch}) not a multiple of dp"] += 1
            continue
        micro = [b for b in micro if _schedulable(layout, global_batch // (b * dp))]
        if not micro:
            rejected["parallel.vpp (microbatches not a multiple of pp)"] += 1
            continue
        groups = _stage_groups(cfg, layout.pp, formats, layout.vpp)
        params = all_stage_params(cfg.model, layout, vocab, table)
        options = [evaluate(cfg, layout, dp, b, rc, gpu, seq_len, global_batch, vocab, table,
                            params, groups, model_flops, mixed_peak, cache)
                   for b in micro for rc in RECOMPUTE]
        fitting = [p for p in options if p.fits]
        best.append(min(fitting, key=lambda p: p.time["step"]) if fitting
                    else min(options, key=lambda p: p.memory["total"]))
    ranked = sorted(best, key=lambda p: (not p.fits,
                                         p.time["step"] if p.fits else p.memory["total"]))
    breakdown = flops_breakdown(cfg.model, seq_len, vocab)
    context = {
        "recipe": cfg.recipe, "gpu": gpu.name, "gpus": world, "gpu_memory_gb": gpu.memory_gb,
        "seq_len": seq_len, "global_batch": global_batch, "tokens_per_step": global_batch * seq_len,
        "precision": cfg.precision.recipe, "vocab_size": vocab,
        "model_tflop_per_token": per_token / 1e12,
        "flops_share": {k: v / breakdown["total"] for k, v in breakdown.items() if k != "total"},
        "peak_tflops": {"bf16": gpu.bf16_tflops, "model_mix": mixed_peak / 1e12},
    }
    return PlanResult(ranked, rejected, context)


def annotate(cfg: HymoeConfig, p: Plan, world: int, gpu: GPU) -> None:
    """What stands between the plan and ``hymoe train`` today, as notes on the plan."""
    from hymoe.train.config import ConfigError, validate

    trial = dataclasses.replace(
        cfg, parallel=p.layout, train=dataclasses.replace(cfg.train, micro_batch=p.micro_batch))
    try:
        validate(trial, world)
    except ConfigError as e:
        p.notes.append(f"hymoe train refuses it today: {e}")
    if RECOMPUTE_OVERRIDES[p.recompute] is None:
        p.notes.append(f"needs megatron {RECOMPUTE_FLAGS[p.recompute]} (Transformer Engine "
                       "layers and grouped GEMM; not in hymoe yet)")
    if cfg.precision.recipe in ("nvfp4", "mxfp8") and not gpu.mx_formats:
        p.notes.append(f"{gpu.name} has no {cfg.precision.recipe} tensor cores: quantized GEMMs "
                       "are emulated at BF16 speed")
