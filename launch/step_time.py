"""Estimated step time of a layout: compute from the FLOP counter and the GPU's peaks, plus a simple
communication model, plus the pipeline bubble.

Per microbatch and pipeline stage, one rank spends
- compute: each module's FLOPs (``hymoe.model.flops``) on this rank, forward + backward (3×),
  at the peak of the format the precision policy gives it (nvfp4 / mxfp8 on Blackwell, else
  bf16) times an efficiency: big GEMMs reach ``GEMM_EFFICIENCY``, narrow ones (a dimension cut by
  tp, or few tokens per expert) less; attention and the SSD scan run at fixed fractions of the
  BF16 peak; element-wise work is memory-bound (HBM passes over the saved activations);
- communication, not overlapped unless said: TP with sequence parallelism (5 all-gathers or
  reduce-scatters of the layer's activations per column/row linear pair, forward and backward),
  the QKV all-gather when tp > query groups, EP all-to-all (dispatch and combine, both passes),
  CP (ring attention's K/V exchange, hidden behind the attention it feeds; the Mamba
  all-to-alls), and the pipeline's send/recv between stages.
The step is (m + pp − 1) microbatch slots of the slowest stage — the 1F1B bubble is
(pp − 1)/(m + pp − 1) — plus what of the data-parallel gradient reduce-scatter and parameter
all-gather the last backward and first forward cannot hide, plus the optimizer step.
Groups whose ranks fit in one NVLink domain (megatron's rank order: tp innermost, then cp, dp,
pp; experts etp, ep, edp) talk over NVLink, others over the scale-out network.
"""

from __future__ import annotations

from hymoe.launch.hardware import GPU
from hymoe.launch.memory import layer_activations
from hymoe.model.config import ModelConfig
from hymoe.model.flops import layer_flops_by_module
from hymoe.model.pattern import ATTENTION, MAMBA, MLP, MOE
from hymoe.parallel.layout import ParallelConfig

# Fraction of the format's peak a large GEMM reaches (cuBLAS/TE on H100/B200; the block-scaled
# formats pay for quantizing their inputs).
GEMM_EFFICIENCY = {"bf16": 0.75, "mxfp8": 0.70, "nvfp4": 0.60}
# A GEMM whose narrowest dimension is d runs at d / (d + GEMM_HALF) of that.
GEMM_HALF = 128
# Flash/fused attention and the SSD scan kernels, as fractions of the BF16 peak.
ATTENTION_EFFICIENCY = 0.45
SCAN_EFFICIENCY = 0.30
# Element-wise work: each saved activation byte is written in forward, read in backward and its
# gradient written: three HBM passes.
ELEMENTWISE_PASSES = 3
# Share of link bandwidth NCCL achieves.
LINK_EFFICIENCY = 0.75
# Bytes the optimizer step touches per parameter it owns: fp32 grad read, master weight and two
# moments read and written, bf16 weight written.
OPTIMIZER_BYTES = 4 + 8 + 16 + 2
ACT = 2  # bf16 activations


def _bandwidth(gpu: GPU, span: int) -> float:
    """Bytes/s one rank moves in a collective over a group spanning ``span`` consecutive ranks."""
    gbps = gpu.nvlink_gbps if span <= gpu.nvlink_domain else gpu.network_gbps
    return gbps * 1e9 * LINK_EFFICIENCY


def _alltoall(gpu: GPU, nbytes: float, span: int) -> float:
    """Seconds to all-to-all ``nbytes`` per rank over ``span`` ranks: the part leaving the NVLink
    domain goes over the network."""
    if span <= gpu.nvlink_domain:
        return nbytes / _bandwidth(gpu, span)
    off = 1 - gpu.nvlink_domain / span
    return max(nbytes * (1 - off) / _bandwidth(gpu, 1), nbytes * off / _bandwidth(gpu, span))


def _gemm_efficiency(fmt: str, narrowest: float) -> float:
    return GEMM_EFFICIENCY[fmt] * narrowest / (narrowest + GEMM_HALF)


def _narrowest(cfg: ModelConfig, name: str, layout: ParallelConfig, tokens: float) -> float:
    """The narrowest dimension of module ``name``'s GEMM on one rank (what TP cuts, or the
    tokens each local expert gets)."""
    tp, h = layout.tp, cfg.hidden_size
    d_inner = cfg.mamba_num_heads * cfg.mamba_head_dim
    q = cfg.num_attention_heads * cfg.head_dim
    if ".experts." in name:
        local_experts = cfg.num_experts / layout.ep
        per_expert = tokens / tp * cfg.moe_router_topk * layout.expert_tp / local_experts
        return min(cfg.moe_ffn_hidden_size / layout.expert_tp, per_expert)
    widths = {
        "mixer.in_proj": (2 * d_inner + 2 * cfg.mamba_num_groups * cfg.mamba_state_dim) / tp,
        "mixer.out_proj": d_inner / tp,
        "self_attention.linear_qkv": (q + 2 * cfg.num_query_groups * cfg.head_dim) / tp,
        "self_attention.linear_proj": q / tp,
        "mlp.linear_fc1": cfg.ffn_hidden_size / tp, "mlp.linear_fc2": cfg.ffn_hidden_size / tp,
        "mlp.shared_experts.linear_fc1": (cfg.moe_shared_expert_intermediate_size or 0) / tp,
        "mlp.shared_experts.linear_fc2": (cfg.moe_shared_expert_intermediate_size or 0) / tp,
        "mlp.router": cfg.num_experts,
        "mlp.fc1_latent_proj": cfg.moe_latent_size or h,
        "mlp.fc2_latent_proj": cfg.moe_latent_size or h,
    }
    return widths[name]


def layer_time(cfg: ModelConfig, symbol: str, formats: dict[str, str], seq_len: int,
               tokens: float, layout: ParallelConfig, recompute: str, gpu: GPU) -> dict[str, float]:
    """Seconds one rank spends on one layer for one microbatch, forward + backward:
    {'compute', 'tp', 'ep', 'cp'}. ``formats``: the GEMM format of each module of the layer;
    ``tokens``: (seq_len/cp)·micro_batch."""
    tp, cp = layout.tp, layout.cp
    share = tokens / tp  # every module's work splits over TP (sequence-parallel tokens or heads)
    compute = attention = 0.0
    for name, f in layer_flops_by_module(cfg, symbol, seq_len).items():
        passes = 3 + (1 if recompute == "moe" and symbol == MOE else 0)
        flops = passes * f * share
        if name == "mixer.scan":
            compute += flops / (gpu.bf16_tflops * 1e12 * SCAN_EFFICIENCY)
        elif name == "self_attention.core_attention":
            attention = flops / (gpu.bf16_tflops * 1e12 * ATTENTION_EFFICIENCY)
            compute += attention
        else:
            fmt = formats.get(name, "bf16")
            eff = _gemm_efficiency(fmt, _narrowest(cfg, name, layout, tokens))
            compute += flops / (gpu.peak_tflops(fmt) * 1e12 * eff)
    saved, _ = layer_activations(cfg, symbol, tokens, layout, "none")
    compute += ELEMENTWISE_PASSES * saved / (gpu.hbm_tbps * 1e12)
    if recompute != "none":  # norms (and expert activations) run again
        compute += cfg.hidden_size * share * ACT * 2 / (gpu.hbm_tbps * 1e12)

    h = cfg.hidden_size
    out = {"compute": compute, "tp": 0.0, "ep": 0.0, "cp": 0.0}
    full = ACT * tokens * h  # one layer-boundary activation, whole sequence share
    if tp > 1:
        # One column/row linear pair per layer; an MoE layer's is its shared expert.
        shared = int(bool(cfg.moe_shared_expert_intermediate_size))
        pairs = 1 if symbol in (MAMBA, ATTENTION, MLP) else shared
        out["tp"] = 5 * pairs * full * (tp - 1) / tp / _bandwidth(gpu, tp)
        if symbol == ATTENTION and cfg.num_query_groups < tp:
            qkv = ACT * tokens * (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.head_dim
            out["tp"] += qkv * (tp - 1) / tp / _bandwidth(gpu, tp)
    if symbol == MOE:
        width = cfg.moe_latent_size or h
        routed = ACT * share * cfg.moe_router_topk * width  # bytes of this rank's token copies
        passes = 4 + (2 if recompute == "moe" else 0)  # dispatch + combine, forward + backward
        ep, etp = layout.ep, layout.expert_tp
        if ep > 1:
            out["ep"] = _alltoall(gpu, passes * routed * (ep - 1) / ep, ep * etp)
        if etp > 1:
            out["ep"] += passes * routed * (etp - 1) / _bandwidth(gpu, etp)
    if cp > 1 and symbol == ATTENTION:
        kv = ACT * tokens * 2 * cfg.head_dim * max(cfg.num_query_groups // tp, 1)
        ring = 3 * (cp - 1) * kv / _bandwidth(gpu, tp * cp)
        out["cp"] = max(0.0, ring - attention)  # each step's K/V arrive while the last attends
    if cp > 1 and symbol == MAMBA:
        d_inner = cfg.mamba_num_heads * cfg.mamba_head_dim
        width = 3 * d_inner + 2 * cfg.mamba_num_groups * cfg.mamba_state_dim + cfg.mamba_num_heads
        out["cp"] = _alltoall(gpu, 2 * ACT * tokens * width / tp * (cp - 1) / cp, tp * cp)
    return out


def output_time(cfg: ModelConfig, vocab: int, tokens: float, layout: ParallelConfig,
                gpu: GPU) -> float:
    """The output layer (BF16 by the policy) and its MTP repeats, forward + backward (and the
    forward again when the loss runs in recomputed chunks)."""
    heads = 1 + len(cfg.mtp_depths)
    chunk = getattr(cfg, "loss_chunk_tokens", 0)
    passes = 4 if chunk and chunk < tokens else 3
    flops = heads * passes * 2 * cfg.hidden_size * vocab * tokens / layout.tp
    return flops / (gpu.bf16_tflops * 1e12 * GEMM_EFFICIENCY["bf16"])


def step_time(stage_times: list[float], stage_forward: list[float], layout: ParallelConfig,
              dp: int, num_micro: int, dense_params: float, expert_params: float,
              optimizer_params: float, tokens: float, hidden: int, gpu: GPU) -> dict[str, float]:
    """Seconds per optimizer step from each stage's time per microbatch (``stage_times``, its
    forward share ``stage_forward``): {'step', 'bubble', 'pp', 'dp', 'optimizer'}."""
    tp, cp, pp, vpp = layout.tp, layout.cp, layout.pp, layout.vpp
    slot = max(stage_times)
    p2p = 0.0
    if pp > 1:
        # Send/recv of one microbatch's [tokens/tp, h] activation (forward) and its gradient
        # (backward) between neighbouring stages, which sit tp·cp·dp ranks apart; once per
        # model chunk with virtual stages.
        p2p = vpp * 2 * ACT * tokens / tp * hidden / _bandwidth(gpu, 2 * tp * cp * dp)
        slot += p2p
    # Interleaved, the fill and drain take (pp - 1) chunk slots, each 1/vpp of a stage's.
    slots = num_micro + (pp - 1) / vpp
    pipeline = slots * slot
    bubble = (pp - 1) / (vpp * num_micro + pp - 1)
    # Data parallel: fp32 gradient reduce-scatter (all-reduce without the distributed optimizer)
    # and bf16 parameter all-gather, dense over dp·cp, experts over the expert-dp group; the
    # last microbatch's backward and the next step's first forward hide what they can.
    edp = tp * cp * dp // (layout.expert_tp * layout.ep)
    span = tp * cp * dp
    comm = 0.0
    gather = 0.0
    for n, params in ((dp * cp, dense_params), (edp, expert_params)):
        if n > 1:
            frac = (n - 1) / n
            reduce = 4 * params * frac * (1 if layout.distributed_optimizer else 2)
            comm += reduce / _bandwidth(gpu, span)
            if layout.distributed_optimizer:
                gather += 2 * params * frac / _bandwidth(gpu, span)
    last_backward = max(t - f for t, f in zip(stage_times, stage_forward))
    first_forward = min(stage_forward)
    dp_exposed = max(0.0, comm - last_backward) + max(0.0, gather - first_forward)
    optimizer = OPTIMIZER_BYTES * optimizer_params / (gpu.hbm_tbps * 1e12)
    return {"step": pipeline + dp_exposed + optimizer, "bubble": bubble,
            "pp": slots * p2p, "dp": dp_exposed,
            "optimizer": optimizer}
