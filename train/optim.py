"""Optimizer and LR schedule: megatron-core's (distributed) optimizer and param scheduler.

AdamW with decoupled weight decay; no decay on 1-D parameters (norm weights, Mamba's A_log, D,
dt_bias) and biases — megatron-core's default rule. Schedules: warmup then
``wsd`` (warmup-stable-decay; Nemotron 3), ``cosine``, or ``constant``, stepped once per optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 10
    # wsd | cosine | constant
    schedule: str = "wsd"
    # WSD: fraction of the steps spent decaying, and the decay shape.
    decay_fraction: float = 0.2
    decay_style: str = "minus_sqrt"
    # On resume, a schedule that differs from the checkpoint's (lr, min_lr, warmup, steps, …) stops
    # with the differences; true continues from the checkpoint's step on this recipe's schedule
    # (Megatron-LM's --override-opt_param-scheduler).
    override_schedule: bool = False

    def validate(self, steps: int) -> None:
        def fail(field, msg):
            raise ValueError(f"optim.{field}: {msg}")

        if self.schedule not in ("wsd", "cosine", "constant"):
            fail("schedule", f"must be wsd, cosine or constant, got {self.schedule!r}")
        if self.decay_style not in ("linear", "cosine", "exponential", "minus_sqrt"):
            fail("decay_style", f"must be linear, cosine, exponential or minus_sqrt, got {self.decay_style!r}")
        if not 0 <= self.min_lr <= self.lr:
            fail("min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            fail("decay_fraction", f"must be in [0, 1], got {self.decay_fraction}")
        if self.warmup_steps < 0 or self.warmup_steps > steps:
            fail("warmup_steps", f"must be in [0, train.steps={steps}], got {self.warmup_steps}")


def build_optimizer(cfg: OptimConfig, model_chunks: list, *, distributed: bool, bf16: bool):
    config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed,
    )
    return get_megatron_optimizer(config, model_chunks)


def build_scheduler(cfg: OptimConfig, optimizer, steps: int) -> OptimizerParamScheduler:
    style = {"wsd": "WSD", "cosine": "cosine", "constant": "constant"}[cfg.schedule]
    # megatron requires warmup < decay steps; a run as short as its warmup just never decays.
    decay_steps = max(steps, cfg.warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.warmup_steps else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        wsd_decay_steps=max(1, int(round(cfg.decay_fraction * steps))) if style == "WSD" else None,
        lr_wsd_decay_style=cfg.decay_style if style == "WSD" else None,
        override_opt_param_scheduler=cfg.override_schedule,
        use_checkpoint_opt_param_scheduler=not cfg.override_schedule,
    )
