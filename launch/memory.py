"""Per-GPU memory of a training layout, from the config alone: parameters, gradients, optimizer
state, activations (per layer type, under a recompute choice, with the pipeline's in-flight
microbatches), the logits, and quantized weight copies.

What is counted is what hymoe's trainer holds on a GPU: parameters in the compute dtype (bf16),
megatron DDP's gradient buffer in fp32 (``grad_reduce_in_fp32``), megatron's optimizer with fp32
master weights (when the parameters are not fp32) and two fp32 Adam moments — sharded over the
data-parallel ranks by the distributed optimizer (dense parameters over dp·cp, experts over the
expert-data-parallel group, as megatron-core does). Activations assume the GPU kernels a real run
uses (fused/flash attention, the SSD scan saving chunk states); ``tests/test_plan.py`` holds the
parameter, gradient and optimizer bytes against a megatron-core model built on CPU.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hymoe.model.config import ModelConfig
from hymoe.model.counting import layer_params
from hymoe.model.flops import layer_flops_by_module
from hymoe.model.pattern import ATTENTION, MAMBA, MLP, MOE, parse
from hymoe.parallel.layout import ParallelConfig, chunk_layers
from hymoe.precision.config import PrecisionConfig
from hymoe.precision.policy import decide

GB = 1e9  # memory is counted in the data sheets' unit
# Recompute choices megatron-core 0.16.1 offers the hybrid stack (recompute_granularity=selective;
# MambaStack has no full-layer recompute, and Mamba layers none at all):
#   none; selective = recompute_modules [layernorm, moe_act] (norm outputs and the experts'
#   activation are dropped and recomputed: cheap); moe = [layernorm, moe] (each MoE layer keeps
#   only its input and runs again, dispatch included, in backward).
RECOMPUTE = ("none", "selective", "moe")
# Dropless routing: the busiest expert rank receives more than the mean; expert-bias balancing
# keeps it near. Sizes the routed activations of the worst rank.
MOE_IMBALANCE = 1.2
# CUDA context, NCCL and cuBLAS workspaces: outside the model's tensors.
RUNTIME_OVERHEAD = 4 * GB
# Quantized weight copies (Transformer Engine keeps a row-wise and a column-wise copy per
# quantized weight through the step): NVFP4 4 bits + one E4M3 scale per 16 values, MXFP8
# 8 bits + one E8M0 scale per 32 values.
QUANTIZED_COPY_BYTES = {"nvfp4": 2 * (0.5 + 1 / 16), "mxfp8": 2 * (1 + 1 / 32)}
# Modules whose weight is whole on every TP rank (megatron's router, hymoe's latent projections).
REPLICATED = ("mlp.router", "mlp.fc1_latent_proj", "mlp.fc2_latent_proj")
NOT_LINEAR = ("mixer.scan", "self_attention.core_attention")


def padded_vocab(vocab: int, tp: int) -> int:
    from hymoe.train.trainer import padded_vocab as pad

    return pad(vocab, tp)


def stage_layers(cfg: ModelConfig, pp: int, vpp: int = 1) -> list[list[tuple[int, str]]]:
    """(global layer index, symbol) of each pipeline stage: the pattern's '|' stages, or equal
    parts (the layout rules require one or the other); with virtual stages, each rank's chunks."""
    p = parse(cfg.pattern)
    layers = list(enumerate(p.layers))
    if vpp > 1:  # the layout rules make the virtual stages equal
        return [[layers[i] for v in range(vpp) for i in chunk_layers(len(layers), pp, vpp, r, v)]
                for r in range(pp)]
    if len(p.stages) == pp:
        sizes = [len(s) for s in p.stages]
    else:
        sizes = [len(layers) // pp] * pp
    out, start = [], 0
    for n in sizes:
        out.append(layers[start:start + n])
        start += n
    return out


def linear_weights(cfg: ModelConfig, symbol: str) -> dict[str, int]:
    """Weights of each linear module of one layer (all experts together for the routed ones): a
    weight GEMM spends 2 FLOPs per weight per token, and a token uses topk of num_experts."""
    out = {}
    for name, f in layer_flops_by_module(cfg, symbol, 0).items():
        if name in NOT_LINEAR:  # no weights
            continue
        n = f / 2
        if ".experts." in name:
            n = n * cfg.num_experts / cfg.moe_router_topk
        out[name] = round(n)
    return out


def module_formats(cfg: ModelConfig, precision: PrecisionConfig) -> list[dict[str, str]]:
    """The GEMM format of every linear module of every layer, as the precision policy decides it
    for the built model (``hymoe precision show`` shows the same)."""
    out = []
    for i, s in enumerate(cfg.layer_pattern):
        formats = {}
        for name in linear_weights(cfg, s):
            if name == "mlp.router":  # fp32 router, not a quantizable linear
                continue
            policy_name = f"decoder.layers.{i}.{name}".replace(
                ".experts.", ".experts.local_experts.0.")
            formats[name] = decide(policy_name, i, cfg.num_layers, precision)[0]
        out.append(formats)
    return out


def model_table(cfg: ModelConfig, precision: PrecisionConfig) -> dict:
    """What the per-layout functions look up per layer kind, computed once per model:
    {'split': {symbol: layer_param_split}, 'linears': {symbol: linear_weights},
    'formats': [module_formats per layer]}."""
    symbols = set(cfg.layer_pattern) | set("".join(cfg.mtp_depths))
    return {"split": {s: layer_param_split(cfg, s) for s in symbols},
            "linears": {s: linear_weights(cfg, s) for s in symbols},
            "formats": module_formats(cfg, precision)}


def layer_param_split(cfg: ModelConfig, symbol: str) -> dict[str, int]:
    """One layer's parameters by how they shard: {'tp': split over TP, 'replicated': whole on
    every TP rank (norms, router, latent projections), 'expert': split over ep·etp}."""
    lin = linear_weights(cfg, symbol)
    replicated = cfg.hidden_size + sum(lin.get(n, 0) for n in REPLICATED)  # + the layer's norm
    expert = sum(n for k, n in lin.items() if ".experts." in k)
    return {"tp": layer_params(cfg, symbol) - replicated - expert, "replicated": replicated,
            "expert": expert}


@dataclass
class StageParams:
    dense: float = 0  # this rank's non-expert parameters
    expert: float = 0  # this rank's expert parameters
    fp32: float = 0  # of those, kept in fp32 whatever the compute dtype (Mamba's A_log, D, dt_bias)
    duplicate: float = 0  # of dense, copies of another stage's weights (the last stage's embedding)
    quantized: dict = field(default_factory=dict)  # format -> this rank's weights in it


def stage_params(cfg: ModelConfig, layout: ParallelConfig, stage: list[tuple[int, str]],
                 first: bool, last: bool, vocab: int, table: dict) -> StageParams:
    """This rank's parameters in one pipeline stage (``table``: ``model_table``)."""
    tp, ep, etp, h = layout.tp, layout.ep, layout.expert_tp, cfg.hidden_size
    out = StageParams()
    for i, s in stage:
        split = table["split"][s]
        out.dense += split["tp"] / tp + split["replicated"]
        out.expert += split["expert"] / (ep * etp)
        if s == MAMBA:
            out.fp32 += 3 * cfg.mamba_num_heads / tp
        for name, n in table["linears"][s].items():
            fmt = table["formats"][i].get(name)
            if fmt in QUANTIZED_COPY_BYTES:
                shards = ep * etp if ".experts." in name else 1 if name in REPLICATED else tp
                local = n / shards
                out.quantized[fmt] = out.quantized.get(fmt, 0) + local
    embedding = padded_vocab(vocab, tp) * h / tp
    if first:
        out.dense += embedding
    if last:
        if cfg.untie_embeddings_and_output_weights:
            out.dense += embedding  # the output layer
        if layout.pp > 1 and (not cfg.untie_embeddings_and_output_weights or cfg.mtp_depths):
            # A copy of the first stage's embedding: megatron's tied output weight, and the input
            # embedding MTP reads (hymoe.model.mtp); one copy serves both when tied.
            out.dense += embedding
            out.duplicate += embedding
        out.dense += h  # final norm
        if cfg.mtp_depths:
            # MTP: its layers (one shared by all depths, or one per depth), each with its eh_proj
            # 2h → h and three norms.
            copies = 1 if cfg.mtp_shared_layer else len(cfg.mtp_depths)
            for s in cfg.mtp_depths[0]:
                split = table["split"][s]
                out.dense += copies * (split["tp"] / tp + split["replicated"])
                out.expert += copies * split["expert"] / (ep * etp)
            out.dense += copies * (2 * h * h / tp + 3 * h)
    return out


def static_bytes(p: StageParams, layout: ParallelConfig, dp: int, param_bytes: int,
                 native_quantized: bool) -> dict[str, float]:
    """{'params', 'grads', 'optimizer', 'quantized'} bytes on this rank."""
    edp = layout.tp * layout.cp * dp // (layout.expert_tp * layout.ep)
    state = 8 + (4 if param_bytes != 4 else 0)  # Adam moments (+ fp32 master weights)
    if layout.distributed_optimizer:
        opt = state * (p.dense / (dp * layout.cp) + p.expert / edp)
    else:
        opt = state * (p.dense + p.expert)
    quant = sum(QUANTIZED_COPY_BYTES[f] * n for f, n in p.quantized.items())
    quant = quant if native_quantized else 0
    params = param_bytes * (p.dense + p.expert - p.fp32) + 4 * p.fp32
    return {"params": params, "grads": 4 * (p.dense + p.expert),
            "optimizer": opt, "quantized": quant}


def layer_activations(cfg: ModelConfig, symbol: str, tokens: int, layout: ParallelConfig,
                      recompute: str, a: int = 2) -> tuple[float, float]:
    """(saved, transient) activation bytes of one layer for one microbatch on one rank.
    ``tokens``: this rank's sequence share times the micro batch, (seq_len/cp)·micro_batch.
    Saved: kept for backward. Transient: the layer's peak working set beyond that (dispatch
    buffers, gathered QKV, ring-attention chunks), alive only while the layer runs."""
    tp, etp, h = layout.tp, layout.expert_tp, cfg.hidden_size
    n = tokens / tp  # tokens per rank between layers (sequence parallel)
    norm = a * n * h  # a layer's input (saved by its norm) or the norm's output (saved by a linear)
    if symbol == MAMBA:
        d_inner = cfg.mamba_num_heads * cfg.mamba_head_dim
        bc = 2 * cfg.mamba_num_groups * cfg.mamba_state_dim
        in_out = a * tokens * (2 * d_inner + bc + cfg.mamba_num_heads) / tp  # z, xBC, dt
        conv_out = a * tokens * (d_inner + bc) / tp
        states = 4 * tokens / cfg.mamba_chunk_size * (d_inner / tp) * cfg.mamba_state_dim
        y = 2 * a * tokens * d_inner / tp  # scan output, gated-norm output
        return 2 * norm + in_out + conv_out + states + y, in_out
    if symbol == ATTENTION:
        hd = cfg.head_dim
        q = cfg.num_attention_heads * hd / tp
        kv = 2 * hd * max(cfg.num_query_groups // tp, 1)  # K and V of this rank's groups
        saved = 2 * norm + a * tokens * (2 * q + kv) + 4 * tokens * cfg.num_attention_heads / tp
        if recompute != "none":
            saved -= norm
        transient = 2 * a * tokens * kv if layout.cp > 1 else 0.0  # ring: the next K/V chunk
        if cfg.num_query_groups < tp:  # QKV output all-gathered over TP
            transient += a * tokens * (cfg.num_attention_heads + 2 * cfg.num_query_groups) * hd
        return saved, transient
    if symbol == MLP:
        saved = 2 * norm + 2 * a * tokens * cfg.ffn_hidden_size / tp
        return saved - (norm if recompute != "none" else 0), 0.0
    if symbol == MOE:
        width = cfg.moe_latent_size or h
        routed = n * cfg.moe_router_topk * MOE_IMBALANCE  # token copies this rank's experts get
        ffn = cfg.moe_ffn_hidden_size / etp
        # fc1 input, fc1 and activation outputs, fc2 output
        experts = a * routed * etp * (width + 2 * ffn) + a * routed * width
        router = 2 * 4 * n * cfg.num_experts  # fp32 logits and scores
        shared = 2 * a * tokens * (cfg.moe_shared_expert_intermediate_size or 0) / tp
        latent = a * n * cfg.moe_latent_size if cfg.moe_latent_size else 0
        dispatch = 2 * a * routed * width  # permuted tokens sent and received
        layer = 2 * norm + router + experts + shared + latent
        if recompute == "selective":
            return layer - norm - a * routed * etp * ffn, dispatch
        if recompute == "moe":
            return norm, dispatch + layer
        return layer, dispatch
    raise ValueError(symbol)


def logits_bytes(cfg: ModelConfig, tokens: int, tp: int, vocab: int) -> tuple[float, float]:
    """(saved, transient) of the output layer and loss for one microbatch. Whole: the fp32
    softmax the vocab-parallel cross entropy saves, and bf16 logits plus an fp32 temporary while
    it runs; MTP depths add theirs. In chunks (``model.loss_chunk_tokens``): nothing saved (each
    chunk's logits are recomputed in backward), one chunk's logits, softmax and gradient live."""
    v = padded_vocab(vocab, tp) / tp
    chunk = getattr(cfg, "loss_chunk_tokens", 0)
    if chunk and chunk < tokens:
        return 0.0, (2 + 4 + 4) * chunk * v
    heads = 1 + len(cfg.mtp_depths)
    return heads * 4 * tokens * v, (2 + 4) * tokens * v


def all_stage_params(cfg: ModelConfig, layout: ParallelConfig, vocab: int,
                     table: dict) -> list[StageParams]:
    stages = stage_layers(cfg, layout.pp, layout.vpp)
    return [stage_params(cfg, layout, st, r == 0, r == len(stages) - 1, vocab, table)
            for r, st in enumerate(stages)]


def stage_memory(cfg: ModelConfig, layout: ParallelConfig, dp: int, seq_len: int,
                 micro_batch: int, num_micro: int, vocab: int, precision: PrecisionConfig,
                 recompute: str, param_bytes: int = 2, native_quantized: bool = True,
                 table: dict | None = None, params: list[StageParams] | None = None) -> list[dict]:
    """Bytes on one rank of each pipeline stage: params, grads, optimizer, quantized (weight
    copies in nvfp4/mxfp8, where the GPU runs those formats natively), activations (in-flight
    microbatches × saved), transient, overhead, total. ``param_bytes``: 2 for bf16 parameters
    (a GPU run), 4 for fp32. ``table`` and ``params`` (``model_table``, ``all_stage_params``)
    save recomputing what does not change with the micro batch or the recompute choice."""
    stages = stage_layers(cfg, layout.pp, layout.vpp)
    table = table or model_table(cfg, precision)
    params = params or all_stage_params(cfg, layout, vocab, table)
    tokens = seq_len // layout.cp * micro_batch
    out = []
    for r, stage in enumerate(stages):
        last = r == len(stages) - 1
        p = params[r]
        mem = static_bytes(p, layout, dp, param_bytes, native_quantized)
        kinds = Counter(s for _, s in stage)
        per_kind = {s: layer_activations(cfg, s, tokens, layout, recompute) for s in kinds}
        saved = sum(n * per_kind[s][0] for s, n in kinds.items())
        transient = max(x[1] for x in per_kind.values())
        if last:
            ls, lt = logits_bytes(cfg, tokens, layout.tp, vocab)
            saved += ls
            transient = max(transient, lt)
        # 1F1B: stage r holds the activations of pp - r microbatches at its peak. Interleaved,
        # megatron's warm-up runs 2(pp - r - 1) + (vpp - 1)·pp chunk-microbatches of 1/vpp of
        # the stage each, one more at the peak.
        in_flight = min(layout.pp - r, num_micro)
        if layout.vpp > 1:
            chunks = 2 * (layout.pp - r - 1) + (layout.vpp - 1) * layout.pp + 1
            in_flight = min(chunks, num_micro * layout.vpp) / layout.vpp
        mem.update(activations=in_flight * saved, transient=transient, overhead=RUNTIME_OVERHEAD,
                   in_flight=in_flight, dense_params=p.dense, expert_params=p.expert)
        mem["total"] = sum(mem[k] for k in ("params", "grads", "optimizer", "quantized",
                                            "activations", "transient", "overhead"))
        out.append(mem)
    return out
