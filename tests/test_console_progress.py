"""The console line (train/callbacks.py `ConsoleProgress`): what it shows of each logging
interval, and the hint it prints once when training waits for data."""

from __future__ import annotations

import io
from types import SimpleNamespace

from hymoe.train.callbacks import ConsoleProgress
from rich.console import Console


def test_console_says_when_training_waits_for_data():
    """The step line shows the loader's share of the step time; above 20% over an interval it
    says once what to change."""
    out = io.StringIO()
    trainer = SimpleNamespace(is_logger=True, console=Console(file=out, width=400), step=0,
                              cfg=SimpleNamespace(train=SimpleNamespace(steps=6)))
    cb = ConsoleProgress(log_interval=2, enabled=False)
    cb.on_train_start(trainer)
    for step, wait in enumerate([0.01, 0.01, 0.5, 0.5, 0.6, 0.6], start=1):
        cb.on_step_end(trainer, {"step": step, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0,
                                 "tokens_per_s": 1.0, "tflops_per_rank": 0.0, "tokens": step,
                                 "skipped": False, "step_time_s": 1.0, "data/wait_s": wait})
    lines = out.getvalue().splitlines()
    assert [ln.split("| data ")[1][:3] for ln in lines if ln.startswith("step")] == ["1%", "50%", "60%"]
    hints = [ln for ln in lines if "training waits for data" in ln]
    assert len(hints) == 1 and "data.shard_prefetch_threads" in hints[0]
