"""The planner's memory model against what a real run holds (issue 5): train a recipe for a few
steps in this process (hymoe's Trainer, one device) and compare with ``hymoe.launch.memory``'s
estimate for the same config:

- the state kept between steps (parameters, megatron's gradient buffer, optimizer state) — on CUDA
  ``torch.cuda.memory_allocated()`` after the run, on CPU the bytes of those tensors;
- the peak (state + saved activations + the largest transient) — ``torch.cuda.max_memory_allocated()``
  over the run, CUDA only.

The CUDA context, NCCL and cuBLAS workspaces live outside the allocator, so the planner's fixed
overhead is left out of the comparison. The planner's activation model assumes the GPU kernels
(fused attention, the SSD scan saving chunk states), so the peak is compared on CUDA only; on CPU
the script checks the state and that the harness runs. ``make gpu-check`` runs it on tiny_gpu.

    python benchmarks/memory_check.py [--recipe tiny_gpu] [--steps 4] [--json F] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_bytes(trainer) -> int:
    """Parameters, gradient buffers and optimizer state the trainer holds (counted once each)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for chunk in trainer.chunks:
        for p in chunk.parameters():
            add(p)
            add(getattr(p, "main_grad", None))
    for sub in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        for state in sub.optimizer.state.values():
            for k, v in state.items():
                if k != "step":
                    add(v)
        for group in sub.optimizer.param_groups:
            for p in group["params"]:
                add(p)
    return total


def planned(cfg, vocab: int, dtype: torch.dtype) -> dict:
    """The planner's bytes for this run's single stage (dp = 1, no native low-precision copies:
    the GPUs this runs on emulate NVFP4)."""
    from hymoe.launch.memory import stage_memory

    t = cfg.train
    stage = stage_memory(cfg.model, cfg.parallel, 1, t.seq_len, t.micro_batch,
                         t.global_batch // t.micro_batch, vocab, cfg.precision, "none",
                         param_bytes=torch.finfo(dtype).bits // 8, native_quantized=False)[0]
    stage["state"] = stage["params"] + stage["grads"] + stage["optimizer"]
    stage["peak"] = stage["state"] + stage["activations"] + stage["transient"]
    return stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="tiny_gpu")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="refuse to run elsewhere (default: CUDA when present)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (e.g. data.path=...)")
    args = ap.parse_args()

    from hymoe.train.recipe import load_recipe
    from hymoe.train.trainer import Trainer

    work = Path(tempfile.mkdtemp(prefix="hymoe-memory-check-"))
    cfg = load_recipe(args.recipe, [
        f"train.steps={args.steps}", "optim.warmup_steps=1", "logging.wandb=disabled",
        "logging.progress=false", "checkpoint.save_final=false", f"run.dir={work / 'run'}",
        *args.overrides])
    if cfg.train.recompute != "none":
        raise SystemExit("memory_check compares the planner's recompute=none model; "
                         f"the recipe has train.recompute={cfg.train.recompute}")
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("memory_check --device cuda: no CUDA device")
    if args.device == "cpu" and cuda:
        raise SystemExit("memory_check --device cpu: a CUDA device is present; the trainer would use it")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(cfg)
    trainer.train()
    plan = planned(cfg, trainer.vocab_size, trainer.dtype)
    measured = {"state": state_bytes(trainer)}
    if cuda:
        torch.cuda.synchronize()
        measured.update(allocated_after=torch.cuda.memory_allocated(),
                        peak=torch.cuda.max_memory_allocated())
    out = {"recipe": args.recipe, "device": "cuda" if cuda else "cpu",
           "dtype": str(trainer.dtype).removeprefix("torch."),
           "planned_bytes": {k: plan[k] for k in ("params", "grads", "optimizer", "activations",
                                                   "transient", "state", "peak")},
           "measured_bytes": measured,
           "ratio_state": measured["state"] / plan["state"],
           "ratio_peak": measured["peak"] / plan["peak"] if cuda else None}
    mb = 1 / 2**20
    lines = [f"memory check: {args.recipe} on {out['device']} ({out['dtype']}), {args.steps} steps",
             (f"  state (params+grads+optimizer): measured {measured['state'] * mb:,.1f} MiB, "
              f"planned {plan['state'] * mb:,.1f} MiB -> measured/planned {out['ratio_state']:.3f}")]
    if cuda:
        lines.append(f"  peak: measured {measured['peak'] * mb:,.1f} MiB, planned "
                     f"{plan['peak'] * mb:,.1f} MiB (activations {plan['activations'] * mb:,.1f}, "
                     f"transient {plan['transient'] * mb:,.1f}) -> measured/planned "
                     f"{out['ratio_peak']:.3f}")
    out["text"] = "\n".join(lines)
    print(out["text"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
