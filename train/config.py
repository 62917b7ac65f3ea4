"""The recipe schema: one typed dataclass per component, composed by Hydra from ``recipes/``.

Composition (``load_recipe``) merges the recipe into this schema, so an unknown key or a wrong
type fails before anything starts; ``validate`` then checks the values against each other
(layout against the model, batch sizes against the layout, …). Every error names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hymoe.data.config import DataConfig
from hymoe.model.config import ModelConfig
from hymoe.parallel.layout import ModelDims, ParallelConfig
from hymoe.precision.config import PrecisionConfig
from hymoe.train.optim import OptimConfig


class ConfigError(ValueError):
    """A recipe that cannot run; the message starts with the dotted field name."""


@dataclass
class RunConfig:
    # Run name (defaults to the recipe's name).
    name: str = "run"
    # Where metrics.jsonl, config.yaml, checkpoints and plots go.
    dir: str = "runs/${run.name}/${now:%Y-%m-%d_%H-%M-%S}"


@dataclass
class TrainConfig:
    # Optimizer steps to train for (total, counting steps before a resume).
    steps: int = 100
    seed: int = 1234
    # Sequences per optimizer step, over all data-parallel ranks.
    global_batch: int = 8
    # Sequences per forward/backward pass on one rank.
    micro_batch: int = 2
    seq_len: int = 128
    # auto: continue from the newest checkpoint if there is one; required: fail without one;
    # never: start fresh (fails if the checkpoint folder already holds checkpoints).
    resume: str = "auto"
    # Print a console line every this many steps (metrics.jsonl gets every step).
    log_interval: int = 1
    # Keep packed documents apart: Mamba state resets and attention stays within each document
    # (megatron's reset_attention_mask). Off: each row is one causal stream, as in Megatron-LM.
    document_masks: bool = False
    # Stop after this many steps in a row were skipped for a non-finite loss or grad norm.
    nan_patience: int = 3
    # Stop (after saving a checkpoint) once this step is done, keeping the schedule of
    # train.steps — for time-limited jobs that resume later (megatron's --exit-interval).
    exit_at_step: Optional[int] = None
    # Activation recompute (trade compute for memory): none; selective (megatron-core's
    # --recompute-granularity selective: the recompute_modules of attention, MLP and MoE layers);
    # full (every layer, Mamba included, keeps only its input and recomputes the rest).
    recompute: str = "none"
    # With selective: any of core_attn, mlp, moe, shared_experts (megatron's names; its layernorm
    # recompute needs Transformer Engine).
    recompute_modules: list = field(default_factory=lambda: ["core_attn"])
    # Collect Python garbage on every rank every N steps, with automatic collection off (Megatron-LM's
    # --manual-gc: ranks stall together, not one at a time); 0: Python's automatic collector.
    gc_interval: int = 0
    # Validation loss on data.valid_path every N steps and after the last step (0: off). Each
    # validation reads the same eval_iters global batches, so values compare across steps and
    # runs (the BF16 and NVFP4 arms of a comparison see the same tokens).
    eval_interval: int = 0
    # Global batches per validation (megatron's --eval-iters).
    eval_iters: int = 8


@dataclass
class CheckpointConfig:
    # Default: <run.dir>/checkpoints.
    dir: str = "${run.dir}/checkpoints"
    # Save every N steps (0: only at the end).
    interval: int = 0
    save_final: bool = True
    # Keep the newest K checkpoints (0: keep all), plus every M-th step if keep_every > 0.
    keep_last: int = 3
    keep_every: int = 0
    # Check every file of a checkpoint against its sha256 before loading.
    verify: bool = True
    # If the newest checkpoint is damaged, resume from the newest intact one instead of stopping.
    fallback: bool = False
    # Write interval checkpoints in the background while training continues (Megatron-LM's
    # --async-save); the next save, a stop signal and the end of training wait for it.
    async_save: bool = False
    # Start a fresh run (a new stage) from these model weights: a training checkpoint (a step_*
    # folder, a checkpoints or run folder, a folder of runs: the newest) or `hymoe convert from-hf`
    # output; ignored when resuming. docs/long_context.md.
    init_weights: Optional[str] = None
    # With init_weights: also take the checkpoint's optimizer state (Adam moments). The LR
    # schedule, step count and data position always start fresh.
    init_optimizer: bool = False


@dataclass
class LoggingConfig:
    # wandb mode: offline (default; no network), online, or disabled.
    wandb: str = "offline"
    wandb_project: str = "hymoe"
    # Rich progress bar on the console.
    progress: bool = True
    # [start, end]: profile optimizer steps start..end with torch.profiler on every rank (chrome
    # trace and operator table in <run.dir>/profile/); empty: off.
    profile_steps: list = field(default_factory=list)


@dataclass
class HymoeConfig:
    recipe: str = "???"
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# megatron-core's selective recompute modules that hymoe's layers have (its layernorm recompute
# needs Transformer Engine, moe_act grouped GEMM, mla_up_proj multi-latent attention).
RECOMPUTE_MODULES = ("core_attn", "mlp", "moe", "shared_experts")


def model_dims(model: ModelConfig, seq_len: int = 0) -> ModelDims:
    from hymoe.model.pattern import ATTENTION, MAMBA, MLP, MOE, parse

    p = parse(model.pattern)
    return ModelDims(
        num_layers=p.num_layers,
        stages=tuple(len(s) for s in p.stages) if len(p.stages) > 1 else (),
        attention_heads=model.num_attention_heads if p.count(ATTENTION) else 0,
        query_groups=model.num_query_groups if p.count(ATTENTION) else 0,
        mamba_heads=model.mamba_num_heads if p.count(MAMBA) else 0,
        mamba_groups=model.mamba_num_groups if p.count(MAMBA) else 0,
        num_experts=model.num_experts if p.count(MOE) else 0,
        seq_len=seq_len,
        ffn_hidden=model.ffn_hidden_size if p.count(MLP) else 0,
        moe_ffn_hidden=model.moe_ffn_hidden_size if p.count(MOE) else 0,
        shared_expert_hidden=(model.moe_shared_expert_intermediate_size or 0) if p.count(MOE) else 0,
    )


def validate(cfg: HymoeConfig, world_size: int) -> int:
    """Check everything that can be checked before building anything; return the DP size."""
    try:
        cfg.model.validate()
        cfg.precision.validate()
        dp = cfg.parallel.validate(world_size, model_dims(cfg.model, cfg.train.seq_len))
        cfg.optim.validate(cfg.train.steps)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t = cfg.train

    def fail(field_, msg):
        raise ConfigError(f"train.{field_}: {msg}")

    for name in ("steps", "global_batch", "micro_batch", "seq_len", "log_interval"):
        if getattr(t, name) < 1:
            fail(name, f"must be ≥ 1, got {getattr(t, name)}")
    if t.global_batch % (t.micro_batch * dp):
        fail(
            "global_batch",
            f"{t.global_batch} is not a multiple of micro_batch·dp = {t.micro_batch}·{dp}",
        )
    try:
        cfg.parallel.check_microbatches(t.global_batch // (t.micro_batch * dp))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if t.exit_at_step is not None and not 1 <= t.exit_at_step <= t.steps:
        fail("exit_at_step", f"must be in 1..train.steps={t.steps}, got {t.exit_at_step}")
    if t.recompute not in ("none", "selective", "full"):
        fail("recompute", f"must be none, selective or full, got {t.recompute!r}")
    bad = set(t.recompute_modules) - set(RECOMPUTE_MODULES)
    if t.recompute == "selective" and (bad or not t.recompute_modules):
        fail("recompute_modules", f"{sorted(bad) or 'empty'}: choose from {', '.join(RECOMPUTE_MODULES)}")
    if t.resume not in ("auto", "required", "never"):
        fail("resume", f"must be auto, required or never, got {t.resume!r}")
    if t.seq_len > cfg.model.max_sequence_length:
        fail("seq_len", f"{t.seq_len} exceeds model.max_sequence_length={cfg.model.max_sequence_length}")
    if cfg.logging.wandb not in ("offline", "online", "disabled"):
        raise ConfigError(
            f"logging.wandb: must be offline, online or disabled, got {cfg.logging.wandb!r}"
        )
    for name in ("interval", "keep_last", "keep_every"):
        if getattr(cfg.checkpoint, name) < 0:
            raise ConfigError(f"checkpoint.{name}: must be ≥ 0, got {getattr(cfg.checkpoint, name)}")
    if t.gc_interval < 0:
        fail("gc_interval", f"must be ≥ 0, got {t.gc_interval}")
    ps = cfg.logging.profile_steps
    if ps and not (len(ps) == 2 and all(isinstance(x, int) for x in ps) and 1 <= ps[0] <= ps[1]):
        raise ConfigError(f"logging.profile_steps: must be [start, end] with 1 ≤ start ≤ end, got {list(ps)}")
    if t.nan_patience < 1:
        fail("nan_patience", f"must be ≥ 1, got {t.nan_patience}")
    if t.eval_interval < 0:
        fail("eval_interval", f"must be ≥ 0 (0 = no validation), got {t.eval_interval}")
    if t.eval_iters < 1:
        fail("eval_iters", f"must be ≥ 1, got {t.eval_iters}")
    if t.eval_interval and not cfg.data.valid_path:
        fail("eval_interval", "validation needs held-out data: set data.valid_path to a folder "
             "prepared with the training data's tokenizer (`hymoe data prepare --valid-every N` "
             "writes one beside the training data)")
    return dp
