"""Everything around the step is a callback: metrics file, console progress, wandb, checkpoints,
the NaN guard, garbage collection and the profiler. Each gets ``on_train_start``, ``on_step_end`` and ``on_train_end``; only rank 0
writes files and the console (checkpointing involves every rank)."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import torch


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
    """A rich progress bar plus a line every ``log_interval`` steps. The line shows the loader's
    share of the step time (``data/wait_s``); above ``SLOW_DATA`` over a logging interval, it says
    once what to change."""

    SLOW_DATA = 0.2

    def __init__(self, log_interval: int, enabled: bool = True):
        self.log_interval = log_interval
        self.enabled = enabled
        self._progress = None
        self._wait = self._time = 0.0  # since the last line
        self._warned = False

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
        self._wait += m.get("data/wait_s", 0.0)
        self._time += m["step_time_s"]
        if m["step"] % self.log_interval == 0 or m["step"] == trainer.cfg.train.steps:
            data = self._wait / self._time if self._time > 0 else 0.0
            self._wait = self._time = 0.0
            self.console.print(
                f"step {m['step']:>6}/{trainer.cfg.train.steps} | loss {m['loss']:.4f} | "
                f"lr {m['lr']:.2e} | grad_norm {m['grad_norm']:.3f} | "
                f"tok/s {m['tokens_per_s']:,.0f} | "
                + (f"MFU {m['mfu']:.1%} | " if "mfu" in m else f"TFLOP/s {m['tflops_per_rank']:.3f} | ")
                + f"tokens {m['tokens']:,} | data {data:.0%}"
                + "".join(f" | {k} {v:.4f}" for k, v in m.items() if k.startswith("mtp_loss/"))
                + (" | SKIPPED" if m["skipped"] else "")
            )
            if data > self.SLOW_DATA and not self._warned:
                self._warned = True
                self.console.print(
                    f"[yellow]the data loader took {data:.0%} of the step time (data/wait_s in "
                    "metrics.jsonl): training waits for data. If reads block (network file systems, "
                    "object stores), raise data.shard_prefetch_threads or data.num_workers; see "
                    "docs/data.md, Speed[/yellow]"
                )

        if "val/loss" in m:  # whenever it ran, whatever the logging interval
            self.console.print(
                f"validation at step {m['step']} | loss {m['val/loss']:.4f} | "
                f"ppl {m['val/ppl']:.2f} | tokens {m['val/tokens']:,} | {m['val/time_s']:.1f} s")

    def on_train_end(self, trainer):
        if self._progress:
            self._progress.stop()


class ExpertLoad(Callback):
    """Per MoE layer, how evenly the router spreads tokens: max and mean tokens per expert over the
    step, logged as ``moe/max_over_mean`` (1.0 is perfect balance; the worst layer) and per layer
    (``moe/layer{i}/max_over_mean``, i the global layer index). Counts come from a forward hook on
    megatron-core's router (its routing map); one [moe layers, experts] tensor summed over all ranks,
    so every pipeline stage contributes its own layers."""

    def __init__(self):
        self.layers: list[int] = []
        self.counts: torch.Tensor | None = None
        self.handles = []

    def on_train_start(self, trainer):
        from megatron.core.transformer.moe.router import TopKRouter

        from hymoe.model.pattern import MOE

        pattern = trainer.cfg.model.layer_pattern
        self.layers = [i for i, s in enumerate(pattern) if s == MOE]
        if not self.layers:
            return
        self.counts = torch.zeros(len(self.layers), trainer.cfg.model.num_experts)
        for chunk in trainer.chunks:
            decoder = getattr(getattr(chunk, "module", chunk), "decoder", None)
            if decoder is None:
                continue
            for local, layer in enumerate(decoder.layers):
                for module in layer.modules():
                    if isinstance(module, TopKRouter):
                        row = self.layers.index(layer.layer_number - 1)
                        self.handles.append(module.register_forward_hook(self._hook(row)))

    def _hook(self, row):
        def hook(module, inputs, output):
            if module.training:  # not validation forwards (eval mode)
                self.counts[row] += output[1].detach().sum(0).float().cpu()
        return hook

    def on_step_end(self, trainer, m):
        if self.counts is None:
            return
        import torch.distributed as dist

        counts = self.counts.cuda() if torch.cuda.is_available() else self.counts.clone()
        dist.all_reduce(counts)
        ratios = (counts.max(1).values / counts.mean(1).clamp_min(1e-9)).tolist()
        for layer, r in zip(self.layers, ratios):
            m[f"moe/layer{layer}/max_over_mean"] = r
        m["moe/max_over_mean"] = max(ratios)
        self.counts.zero_()

    def on_train_end(self, trainer):
        for h in self.handles:
            h.remove()
        self.handles = []


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

            from omegaconf import OmegaConf

            os.environ.setdefault("WANDB_SILENT", "true")
            # The whole resolved recipe, as in config.yaml: wandb's run table and `hymoe compare`
            # on wandb runs show which keys differ.
            config = dict(OmegaConf.to_container(OmegaConf.structured(trainer.cfg)), **self.config)
            self.run = wandb.init(
                project=self.project, name=self.name, dir=str(self.run_dir), mode=self.mode,
                config=config, resume="allow",
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
    take part). With ``async_save`` the interval saves are written in the background while
    training goes on (``hymoe.train.async_save``); each step polls the pending one, and the next
    save, a stop signal and the end of training wait for it. The final save is synchronous: the
    run ends right after it."""

    def __init__(self, interval: int, save_final: bool, async_save: bool = False):
        self.interval, self.save_final, self.async_save = interval, save_final, async_save
        self.last_saved = None
        self.saves = None

    def on_train_start(self, trainer):
        if self.async_save:
            from hymoe.train.async_save import AsyncCheckpointQueue

            self.saves = AsyncCheckpointQueue()

    def on_step_end(self, trainer, m):
        if self.saves is not None:
            self._report(trainer, self.saves.poll())
        if self.interval and m["step"] % self.interval == 0:
            if self.saves is not None:
                self._report(trainer, self.saves.wait())  # one save in flight at a time
            trainer.save_checkpoint(self.saves)
            self.last_saved = m["step"]

    def on_train_end(self, trainer):
        if self.saves is not None:
            if trainer.failed:
                # Other ranks may be gone: finalizing is collective. The pending save stays a
                # *.tmp folder and `latest` keeps naming the previous checkpoint.
                self.saves.abort()
            else:
                self._report(trainer, self.saves.wait())
        wanted = self.save_final or trainer.stop_signal is not None
        # After a failure, other ranks may be gone: no collective save.
        if wanted and not trainer.failed and self.last_saved != trainer.step and trainer.step > 0:
            trainer.save_checkpoint()

    @staticmethod
    def _report(trainer, path):
        if path is not None and trainer.is_logger:
            trainer.console.print(f"saved checkpoint {path} (written in the background)")


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


class GarbageCollection(Callback):
    """Python's cyclic garbage collector off, and run on every rank every ``interval`` steps
    (Megatron-LM's --manual-gc): left automatic it starts at a different moment on each rank, and
    the others wait for the slowest at the next collective."""

    def __init__(self, interval: int):
        self.interval = interval

    def on_train_start(self, trainer):
        if self.interval:
            gc.disable()
            gc.collect()

    def on_step_end(self, trainer, m):
        if self.interval and m["step"] % self.interval == 0:
            gc.collect()

    def on_train_end(self, trainer):
        if self.interval:
            gc.enable()


class Profiler(Callback):
    """torch.profiler over optimizer steps ``start..end`` (inclusive, as metrics.jsonl counts them)
    on every rank: ``<run.dir>/profile/trace_rank{r}.json`` (open in chrome://tracing or Perfetto)
    and ``ops_rank{r}.txt``, the operators by total time."""

    def __init__(self, steps: list, run_dir: Path):
        self.start, self.end = (int(steps[0]), int(steps[1])) if steps else (0, -1)
        self.dir = Path(run_dir) / "profile"
        self.prof = None

    def _begin(self):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self.prof.__enter__()

    def on_train_start(self, trainer):
        if self.start and trainer.step + 1 == self.start:
            self._begin()

    def on_step_end(self, trainer, m):
        if self.prof is None and m["step"] + 1 == self.start:
            self._begin()
        elif self.prof is not None and m["step"] >= self.end:
            self._finish()

    def on_train_end(self, trainer):
        self._finish()

    def _finish(self):
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.dir / f"trace_rank{rank}.json"))
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        (self.dir / f"ops_rank{rank}.txt").write_text(table + "\n")
