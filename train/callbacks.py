"""Everything around the step is a callback: metrics file, console progress, wandb, checkpoints,
the NaN guard. Each gets ``on_train_start``, ``on_step_end`` and ``on_train_end``; only rank 0
writes files and the console (checkpointing involves every rank)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class Callback:
    def on_train_start(self, trainer) -> None:
        pass

    def on_step_end(self, trainer, metrics: dict) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass


class MetricsFile(Callback):
    """``<run.dir>/metrics.jsonl``: one JSON object per optimizer step (appended on resume)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._f = None

    def on_train_start(self, trainer):
        if trainer.is_logger:
            self._f = open(self.path, "a", buffering=1)

    def on_step_end(self, trainer, metrics):
        if self._f:
            self._f.write(json.dumps(metrics) + "\n")

    def on_train_end(self, trainer):
        if self._f:
            self._f.close()
            self._f = None


class ConsoleProgress(Callback):
    """A rich progress bar plus a line every ``log_interval`` steps."""

    def __init__(self, log_interval: int, enabled: bool = True):
        self.log_interval = log_interval
        self.enabled = enabled
        self._progress = None

    def on_train_start(self, trainer):
        if not trainer.is_logger:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = trainer.console
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=True,
            )
            self._task = self._progress.add_task(
                "train", total=trainer.cfg.train.steps, completed=trainer.step, loss="-"
            )
            self._progress.start()

    def on_step_end(self, trainer, m):
        if not trainer.is_logger:
            return
        if self._progress:
            self._progress.update(self._task, completed=m["step"], loss=f"{m['loss']:.4f}")
        if m["step"] % self.log_interval == 0 or m["step"] == trainer.cfg.train.steps:
            self.console.print(
                f"step {m['step']:>6}/{trainer.cfg.train.steps} | loss {m['loss']:.4f} | "
                f"lr {m['lr']:.2e} | grad_norm {m['grad_norm']:.3f} | "
                f"tok/s {m['tokens_per_s']:,.0f} | tokens {m['tokens']:,}"
                + (" | SKIPPED" if m["skipped"] else "")
            )

    def on_train_end(self, trainer):
        if self._progress:
            self._progress.stop()


class Wandb(Callback):
    """Weights & Biases, offline unless the recipe says online. A failure to start is a warning."""

    def __init__(self, mode: str, project: str, run_dir: Path, name: str, config: dict):
        self.mode, self.project, self.run_dir, self.name, self.config = mode, project, run_dir, name, config
        self.run = None

    def on_train_start(self, trainer):
        if not trainer.is_logger or self.mode == "disabled":
            return
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=self.project, name=self.name, dir=str(self.run_dir), mode=self.mode,
                config=self.config, resume="allow",
            )
        except Exception as e:  # noqa: BLE001 - logging must never stop training
            trainer.console.print(f"[yellow]wandb disabled: {e}")

    def on_step_end(self, trainer, m):
        if self.run is not None:
            self.run.log(m, step=m["step"])

    def on_train_end(self, trainer):
        if self.run is not None:
            self.run.finish()


class Checkpointer(Callback):
    """Save every ``interval`` steps, at the end, and when asked to stop by a signal (all ranks
    take part)."""

    def __init__(self, interval: int, save_final: bool):
        self.interval, self.save_final = interval, save_final
        self.last_saved = None

    def on_step_end(self, trainer, m):
        if self.interval and m["step"] % self.interval == 0:
            trainer.save_checkpoint()
            self.last_saved = m["step"]

    def on_train_end(self, trainer):
        wanted = self.save_final or trainer.stop_signal is not None
        # After a failure, other ranks may be gone: no collective save.
        if wanted and not trainer.failed and self.last_saved != trainer.step and trainer.step > 0:
            trainer.save_checkpoint()


class NaNGuard(Callback):
    """Stop after ``patience`` consecutive skipped steps (non-finite loss or grad norm; the step's
    update was already skipped by ``guarded_optimizer_step``), naming the steps and the batches."""

    def __init__(self, patience: int = 3):
        self.patience = patience
        self.bad: list[dict] = []

    def on_step_end(self, trainer, m):
        if not m["skipped"]:
            self.bad = []
            return
        self.bad.append(m)
        if trainer.is_logger:
            trainer.console.print(
                f"[yellow]step {m['step']} skipped: loss {m['loss']}, grad_norm {m['grad_norm']}, "
                f"batch at data position {m.get('data_position')}"
            )
        if len(self.bad) >= self.patience:
            steps = [b["step"] for b in self.bad]
            raise FloatingPointError(
                f"{len(self.bad)} steps in a row had a non-finite loss or grad norm (steps {steps}; "
                f"first batch at data position {self.bad[0].get('data_position')}); lower optim.lr, "
                "check the data at that position, or raise train.nan_patience"
            )
