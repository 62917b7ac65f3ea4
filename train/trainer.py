"""The trainer: set up from a validated recipe, then a short loop; the work is in ``train_step``
(``hymoe.train.step``) and the callbacks (``hymoe.train.callbacks``)."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hymoe.train import checkpoint as ckpt
from hymoe.train.callbacks import (
    Checkpointer, ConsoleProgress, ExpertLoad, GarbageCollection, MetricsFile, NaNGuard, Profiler, Wandb,
)
from hymoe.train.config import ConfigError, HymoeConfig, validate
from hymoe.train.mfu import throughput_metrics
from hymoe.train.recipe import to_yaml


def compute_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def padded_vocab(vocab: int, tp: int, multiple: int = 128) -> int:
    """Megatron's rule: pad the vocabulary to a multiple of 128·tp so the output layer shards evenly."""
    m = multiple * tp
    return int(math.ceil(vocab / m) * m)


def ensure_data(cfg: HymoeConfig, console) -> Path:
    """The prepared data folder (or remote location); for demo recipes, prepared here on first use
    (rank 0), with held-out demo documents in ``data.valid_path`` if that is set."""
    from hymoe.data.remote import is_remote

    if is_remote(cfg.data.path):  # its manifest is fetched (and checked) when it is opened
        return cfg.data.path
    path = Path(cfg.data.path)
    if not (path / "manifest.json").exists():
        if not cfg.data.prepare_demo_if_missing:
            raise ConfigError(
                f"data.path: {path} has no manifest.json; run `hymoe data prepare --input ... "
                f"--output {path}` first or point data.path at a prepared folder"
            )
        if dist.get_rank() == 0:
            from hymoe.data.prepare import prepare_demo

            console.print(f"preparing the demo corpus (Python stdlib source) → {path}")
            prepare_demo(path, cfg.data.demo_vocab_size, cfg.data.demo_max_bytes, cfg.logging.progress)
        dist.barrier()
    ensure_valid_data(cfg, path, console)
    return path


def ensure_valid_data(cfg: HymoeConfig, train_path: Path, console) -> None:
    """``data.valid_path`` must be prepared; for demo recipes it is prepared here (rank 0) from
    standard-library files the training corpus leaves out, with its tokenizer."""
    from hymoe.data.remote import is_remote

    valid = cfg.data.valid_path
    if not valid or is_remote(valid) or (Path(valid) / "manifest.json").exists():
        return
    if not cfg.data.prepare_demo_if_missing:
        raise ConfigError(
            f"data.valid_path: {valid} has no manifest.json; prepare held-out text with `hymoe "
            f"data prepare --input ... --output {valid} --tokenizer {train_path}/tokenizer.json`, "
            "or split the corpus with `hymoe data prepare ... --valid-every N` (OUTPUT/valid)"
        )
    if dist.get_rank() == 0:
        from hymoe.data.prepare import prepare_demo_valid

        console.print(f"preparing held-out demo documents for validation → {valid}")
        prepare_demo_valid(valid, train_path / "tokenizer.json", cfg.data.demo_max_bytes,
                           progress=cfg.logging.progress)
    dist.barrier()


def _forked_writer_results_queue() -> None:
    """Give megatron-core's checkpoint writer its results queue from a *forked* manager process.

    megatron-core makes it lazily with a spawned one, and a spawned process starts with no signal
    blocked: Slurm's SIGTERM kills it and the next save fails (BrokenPipeError). A forked one
    inherits the caller's mask (``save_checkpoint`` blocks TERM/USR1 around this)."""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()


class Trainer:
    def __init__(self, cfg: HymoeConfig):
        from rich.console import Console

        from hymoe.parallel.setup import init_distributed

        self.cfg = cfg
        self.console = Console(highlight=False, soft_wrap=True)
        rank, world = init_distributed()
        self.is_logger = rank == 0
        self.dp_size = validate(cfg, world)
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir)
        if self.is_logger:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            self.console.rule(f"hymoe · {cfg.recipe}")
            self.console.print(to_yaml(cfg), markup=False)
        self.step = 0
        self.tokens = 0
        self.failed = False
        self.stop_signal: int | None = None
        self._setup()
        if self.is_logger:
            (self.run_dir / "env.json").write_text(json.dumps(environment(self), indent=1))

    # -- setup ---------------------------------------------------------------------------------
    def _setup(self):
        from megatron.core import parallel_state

        from hymoe.data import build_stream, load_manifest
        from hymoe.data.blend import blend_from_config
        from hymoe.parallel.setup import initialize_model_parallel
        from hymoe.precision.apply import apply_precision
        from hymoe.train.model_setup import build_model_chunks
        from hymoe.train.optim import build_optimizer, build_scheduler

        cfg = self.cfg
        total_tokens = cfg.train.steps * cfg.train.global_batch * cfg.train.seq_len
        if cfg.data.datasets:  # a blend: every dataset must already be prepared
            data_path = blend_from_config(cfg.data, total_tokens).sources[0].path
        else:
            data_path = ensure_data(cfg, self.console)
        manifest = load_manifest(data_path)
        vocab = cfg.model.vocab_size or manifest["tokenizer"]["vocab_size"]
        if vocab < manifest["tokenizer"]["vocab_size"]:
            raise ConfigError(
                f"model.vocab_size: {vocab} is smaller than the data's tokenizer "
                f"({manifest['tokenizer']['vocab_size']}); set it to null to take the tokenizer's"
            )
        self.vocab_size = padded_vocab(vocab, cfg.parallel.tp)
        from hymoe.model.flops import flops_per_token

        depths = cfg.model.mtp_depths
        self.flops_per_token = flops_per_token(
            cfg.model, cfg.train.seq_len, self.vocab_size, mtp_depths=len(depths),
            mtp_pattern=depths[0] if depths else "*E",
        )

        from hymoe.precision.backend import select_backend
        from hymoe.precision.telemetry import Telemetry

        try:
            backend = select_backend(cfg.precision)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if backend.backend == "te":
            raise ConfigError(
                "precision.backend: te needs Transformer Engine module specs in the hybrid model, "
                "which hymoe does not wire yet; use precision.backend=emulated"
            )
        initialize_model_parallel(cfg.parallel, cfg.train.seed)
        self.dtype = compute_dtype(cfg.precision.compute_dtype)
        self.precision_report = []
        self.telemetry = Telemetry.from_config(cfg.precision)
        self.chunks, self.tconfig = build_model_chunks(
            cfg.model, cfg.parallel, self.vocab_size, self.dtype,
            recompute=cfg.train.recompute, recompute_modules=cfg.train.recompute_modules,
            transform=lambda m, c: self.precision_report.extend(
                apply_precision(m, cfg.precision, self.dtype, seed=cfg.train.seed,
                                telemetry=self.telemetry)
            ),
        )
        self.optimizer = build_optimizer(
            cfg.optim, self.chunks, distributed=cfg.parallel.distributed_optimizer,
            bf16=self.dtype == torch.bfloat16,
        )
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, cfg.train.steps)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.micro_per_step = cfg.train.global_batch // (cfg.train.micro_batch * self.dp_size)
        self.data = build_stream(
            cfg.data, cfg.train.seq_len, cfg.train.micro_batch, dp_rank=self.dp_rank,
            dp_size=self.dp_size, seed=cfg.train.seed, total_tokens=total_tokens,
        )
        self.validator = None
        if cfg.train.eval_interval:
            from hymoe.train.validation import Validator

            self.validator = Validator(cfg, self.dp_rank, self.dp_size,
                                       self.data.datasets[0].fingerprint)
        if self.is_logger:
            n_params = sum(p.numel() for c in self.chunks for p in c.parameters())
            self.console.print(
                f"model: {cfg.model.pattern} · {n_params/1e6:.2f}M parameters on this rank · "
                f"vocab {self.vocab_size} · dtype {str(self.dtype).replace('torch.', '')}"
                + (" (fp32 compute on CPU)" if self.dtype == torch.float32 and not torch.cuda.is_available() else "")
                + f" · dp={self.dp_size} tp={cfg.parallel.tp} pp={cfg.parallel.pp}"
                + (f" vpp={cfg.parallel.vpp}" if cfg.parallel.vpp > 1 else "")
                + f" ep={cfg.parallel.ep} cp={cfg.parallel.cp}"
            )
            self.console.print(
                f"precision: {cfg.precision.recipe} · {backend.reason} · "
                + ", ".join(f"{fmt}: {n}" for fmt, n in _count_formats(self.precision_report).items())
            )
        self._resume()
        self.callbacks = [
            # ExpertLoad first: it adds its numbers to the step's metrics for the others to log.
            ExpertLoad(),
            MetricsFile(self.run_dir),
            ConsoleProgress(cfg.train.log_interval, cfg.logging.progress),
            Wandb(cfg.logging.wandb, cfg.logging.wandb_project, self.run_dir, cfg.run.name,
                  {"recipe": cfg.recipe}),
            NaNGuard(cfg.train.nan_patience),
            Checkpointer(cfg.checkpoint.interval, cfg.checkpoint.save_final, cfg.checkpoint.async_save),
            GarbageCollection(cfg.train.gc_interval),
            Profiler(cfg.logging.profile_steps, self.run_dir),
        ]

    def _resume(self):
        mode, cc = self.cfg.train.resume, self.cfg.checkpoint
        latest = ckpt.latest_checkpoint(self.ckpt_dir)
        if latest is None and cc.init_weights and mode != "required":
            # A new stage from another run's checkpoint (e.g. long context after pretraining) or
            # from `hymoe convert from-hf` output; prints what it loads and what the stage changes.
            from hymoe.train.stage import start_from_checkpoint

            start_from_checkpoint(self)
            return
        if latest is None:
            if mode == "required":
                raise ConfigError(
                    f"train.resume: required, but {self.ckpt_dir} holds no complete checkpoint"
                )
            return
        if mode == "never":
            raise ConfigError(
                f"train.resume: never, but {self.ckpt_dir} already holds checkpoints "
                f"(newest {latest.name}); use train.resume=auto or another run.dir"
            )
        # The marker's checkpoint first; with checkpoint.fallback, older intact ones after it.
        candidates = [latest] + [p for p in ckpt.complete_checkpoints(self.ckpt_dir) if p.name < latest.name]
        for i, path in enumerate(candidates):
            try:
                meta = ckpt.load(path, self.chunks, self.optimizer, self.scheduler, cc.verify)
                break
            except ckpt.CheckpointError as e:
                if not cc.fallback or i == len(candidates) - 1:
                    raise
                if self.is_logger:
                    self.console.print(f"[yellow]{e}\n falling back to an older checkpoint")
        if meta.get("pattern") != self.cfg.model.pattern:
            raise ckpt.CheckpointError(
                f"{path}: saved for model.pattern={meta.get('pattern')!r}, "
                f"this run has {self.cfg.model.pattern!r}"
            )
        self.step, self.tokens = meta["step"], meta["tokens"]
        states = meta.get("data_state", {})
        if states:
            # Every DP rank's state: same DP size → this rank's; another → the read streams are
            # dealt anew and each continues exactly (docs/data.md, "Resume").
            msg = self.data.load_rank_states(states)
            if msg and self.is_logger:
                self.console.print(f"[yellow]{msg}")
        if self.is_logger:
            self.console.print(f"resumed from {path} at step {self.step} ({self.tokens:,} tokens)")

    # -- checkpoint ----------------------------------------------------------------------------
    def save_checkpoint(self, async_queue=None):
        """Save on every rank; with ``async_queue`` the shards are written in the background."""
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, (self.dp_rank, self.data.state_dict()))
        data_state = {str(r): s for r, s in states}
        # Slurm signals every process of a job step, including the helper processes that
        # megatron-core's checkpointing starts at the first save and keeps: killed mid-save they
        # break the save on stop. With TERM/USR1 blocked here, processes forked now inherit the
        # block, and this one receives a signal that came during the save right after it.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
        try:
            _forked_writer_results_queue()
            path = ckpt.save(
                self.ckpt_dir, self.step, self.chunks, self.optimizer, self.scheduler,
                {"tokens": self.tokens, "pattern": self.cfg.model.pattern, "dp_size": self.dp_size,
                 "model": dataclasses.asdict(self.cfg.model), "vocab_size": self.vocab_size,
                 "data_state": data_state, "recipe": self.cfg.recipe},
                keep_last=self.cfg.checkpoint.keep_last, keep_every=self.cfg.checkpoint.keep_every,
                async_queue=async_queue,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if self.is_logger:
            self.console.print(f"writing checkpoint {path} in the background" if async_queue
                               else f"saved checkpoint {path}")

    # -- loop ----------------------------------------------------------------------------------
    def _write_telemetry(self, rows: list[dict]) -> None:
        """Per-rank NVFP4/MXFP8 statistics (every precision.telemetry_interval steps)."""
        if rows:
            path = self.run_dir / f"precision_telemetry.rank{dist.get_rank()}.jsonl"
            with open(path, "a") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")

    def _on_signal(self, signum, frame):
        # Slurm sends SIGTERM (or --signal=USR1@T) before it kills a job: finish the step, save.
        self.stop_signal = signum

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal (all ranks must stop at the same step)."""
        flag = torch.tensor([1.0 if self.stop_signal is not None else 0.0])
        if torch.cuda.is_available():
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM
        return flag.item() > 0

    def train(self) -> list[dict]:
        from hymoe.train.step import train_step

        cfg, history = self.cfg, []
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        for cb in self.callbacks:
            cb.on_train_start(self)
        try:
            stop = cfg.train.exit_at_step or cfg.train.steps
            while self.step < stop:
                position = self.data.state_dict()
                self.telemetry.start_step(self.step + 1)
                t0, wait0 = time.perf_counter(), self.data.wait_s
                r = train_step(
                    self.chunks, self.optimizer, self.scheduler, self.data, self.micro_per_step,
                    cfg.train.seq_len, cfg.train.micro_batch, step=self.step + 1,
                    document_masks=cfg.train.document_masks,
                )
                dt = time.perf_counter() - t0
                self._write_telemetry(self.telemetry.end_step())
                self.step += 1
                self.tokens += cfg.train.global_batch * cfg.train.seq_len
                m = {
                    "step": self.step, "loss": r.loss, "lr": self.optimizer.param_groups[0]["lr"],
                    "tokens": self.tokens, "grad_norm": r.grad_norm, "skipped": r.skipped,
                    "step_time_s": dt, "tokens_per_s": cfg.train.global_batch * cfg.train.seq_len / dt,
                }
                m.update(throughput_metrics(m["tokens_per_s"], self.flops_per_token, dist.get_world_size()))
                m.update(r.extra)
                m.update(self.data.metrics())  # data/phase, data/share/<name>, data/skipped_*
                m["data/wait_s"] = self.data.wait_s - wait0  # of step_time_s: the loader's part
                if r.skipped:
                    m["data_position"] = {"tokens": position.get("tokens"), "rr": position.get("rr")}
                if self.validator and (self.step % cfg.train.eval_interval == 0
                                       or self.step == cfg.train.steps):
                    m.update(self.validator.run(self.chunks, self.micro_per_step))
                history.append(m)
                for cb in self.callbacks:
                    cb.on_step_end(self, m)
                if self._stop_requested():
                    if self.is_logger:
                        self.console.print(
                            f"stop requested (signal {signal.Signals(self.stop_signal).name}) after "
                            f"step {self.step}: saving and exiting"
                        )
                    break
        except BaseException:
            self.failed = True
            raise
        finally:
            for cb in self.callbacks:
                cb.on_train_end(self)
            self.data.close()  # reader workers, if any (after the final checkpoint's state_dict)
            if self.validator:
                self.validator.close()
            summary = self.telemetry.summary()
            if summary and self.is_logger:
                (self.run_dir / "precision_telemetry_summary.json").write_text(json.dumps(summary, indent=1))
                self.console.print(self.telemetry.format_summary())
            for s, handler in previous.items():
                signal.signal(s, handler)
        return history


def environment(trainer) -> dict:
    """Versions, hardware and layout of this run (saved as env.json beside config.yaml)."""
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cfg = trainer.cfg
    return {
        "python": platform.python_version(), "platform": platform.platform(),
        "host": platform.node(), "world_size": dist.get_world_size(),
        "layout": {"dp": trainer.dp_size, "tp": cfg.parallel.tp, "pp": cfg.parallel.pp,
                   "vpp": cfg.parallel.vpp, "ep": cfg.parallel.ep, "cp": cfg.parallel.cp},
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cuda": torch.version.cuda, "cpu_layer_active": not torch.cuda.is_available(),
        "packages": {p: version(p) for p in (
            "hymoe", "torch", "megatron-core", "transformer-engine", "mamba-ssm",
            "causal-conv1d", "hydra-core", "webdataset", "wandb", "tokenizers")},
        "dtype": str(trainer.dtype).replace("torch.", ""),
        "precision": cfg.precision.recipe,
    }


def _count_formats(report: list[tuple[str, str, str]]) -> dict:
    counts: dict = {}
    for _, fmt, _ in report:
        counts[fmt] = counts.get(fmt, 0) + 1
    return counts
