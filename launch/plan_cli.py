"""``hymoe plan``: propose layouts for a recipe on N GPUs of a type (table or --json)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the planner imports the model and megatron: only when the command runs
    from hymoe.launch.plan import Plan, PlanResult

PLAN_HELP = """Propose parallel layouts for RECIPE on N GPUs: every tp/cp/ep/etp/pp/dp split that
passes hymoe's layout rules, with per-GPU memory (weights, gradients, optimizer state, activations
under a recompute choice, logits) and an estimated step time and MFU, ranked: layouts that fit in
90% of the GPU's memory first, fastest first. Overrides are the recipe's (KEY=VALUE, as for hymoe
train); parallel.tp=/cp=/ep=/etp=/pp= ones pin that axis and show where those layouts rank.
Estimates, not measurements: docs/parallel.md says what the model assumes."""

AXES = ("tp", "cp", "ep", "etp", "pp")


def _pins(overrides: list[str]) -> dict[str, int]:
    out = {}
    for o in overrides:
        key, _, value = o.partition("=")
        if key.startswith("parallel.") and key.split(".", 1)[1] in AXES:
            out[key.split(".", 1)[1]] = int(value)
    return out


def _matches(p: Plan, pins: dict[str, int]) -> bool:
    lay = p.layout
    values = dict(zip(AXES, (lay.tp, lay.cp, lay.ep, lay.expert_tp, lay.pp)))
    return all(values[k] == v for k, v in pins.items())


def _row(rank: int, p: Plan) -> str:
    m, t, lay = p.memory, p.time, p.layout
    static = (m["params"] + m["grads"] + m["optimizer"] + m["quantized"]) / 1e9
    act = (m["activations"] + m["transient"]) / 1e9
    comm = "/".join(f"{t.get(k, 0):.2f}" for k in ("tp", "ep", "cp", "dp"))
    fits = "" if p.fits else "  (does not fit)"
    return (f"{rank:>4} {lay.tp:>3} {lay.cp:>3} {lay.ep:>4} {lay.expert_tp:>3} {lay.pp:>3}"
            f" {p.dp:>5}"
            f" {p.micro_batch:>3} {p.num_micro:>5} {p.recompute:>9} {static:>7.1f} {act:>7.1f}"
            f" {m['total'] / 1e9:>7.1f} {t['step']:>8.3g} {p.mfu:>5.0%} {p.mfu_bf16:>5.0%}"
            f" {t['bubble']:>6.0%}  {comm}{fits}")


HEADER = ("   #  tp  cp   ep etp  pp    dp  mb     m recompute  state GB  act GB  total GB"
          "   step s   MFU  bf16 bubble  comm s tp/ep/cp/dp")


def render(result: PlanResult, top: int, pins: dict[str, int]) -> str:
    from hymoe.launch.plan import HEADROOM

    c = result.context
    lines = [
        (f"{c['recipe']} on {c['gpus']} × {c['gpu']} ({c['gpu_memory_gb']:.0f} GB), seq_len "
         f"{c['seq_len']:,}, global batch {c['global_batch']} ({c['tokens_per_step']:,} "
         f"tokens/step), precision {c['precision']}"),
        (f"model: {c['model_tflop_per_token'] * 1e3:.1f} GFLOP per token (forward+backward); "
         f"peak {c['peak_tflops']['bf16']:.0f} TFLOP/s BF16, {c['peak_tflops']['model_mix']:.0f} "
         "for this model's format mix (MFU is of that; 'bf16' of the BF16 peak)"),
    ]
    if c.get("global_batch_note"):
        lines.append(c["global_batch_note"])
    plans = result.plans
    fit = sum(p.fits for p in plans)
    refused = ", ".join(f"{k} ×{n}" for k, n in result.rejected.most_common())
    lines.append(f"{len(plans)} layouts pass the layout rules, {fit} fit in {HEADROOM:.0%} of "
                 f"{c['gpu_memory_gb']:.0f} GB" + (f"; refused: {refused}" if refused else ""))
    if not plans:
        return "\n".join(lines)
    lines += ["", HEADER]
    shown = [(i + 1, p) for i, p in enumerate(plans) if _matches(p, pins)][:top]
    lines += [_row(rank, p) for rank, p in shown]
    if pins and not shown:
        lines.append(f"  no layout with {pins} passes the rules on {c['gpus']} GPUs")
    if shown:
        rank, best = shown[0]
        # The batch shape too: --seq-len may have changed both from the recipe's.
        lines += ["", f"#{rank}: hymoe train {c['recipe']} {best.overrides} "
                      f"train.seq_len={c['seq_len']} train.global_batch={c['global_batch']}"]
        lines += [f"  note: {n}" for n in best.notes]
    return "\n".join(lines)


def cmd_plan(argv: list[str]) -> int:
    """propose parallel layouts for N GPUs (memory, step time, MFU)"""
    from hymoe.cli import _fail, _quiet

    _quiet()
    from hymoe.launch.hardware import GPUS

    p = argparse.ArgumentParser(prog="hymoe plan", description=PLAN_HELP)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="recipe overrides, KEY=VALUE")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (the world size)")
    p.add_argument("--gpu", required=True, choices=sorted(GPUS), help="GPU type")
    p.add_argument("--seq-len", type=int, default=None,
                   help="train.seq_len; without train.global_batch=, keeps the recipe's tokens "
                   "per step")
    p.add_argument("--top", type=int, default=10, help="rows to show (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_intermixed_args(argv)  # overrides may come after the options
    from hymoe.launch.hardware import gpu
    from hymoe.launch.plan import annotate, plan
    from hymoe.train.config import ConfigError
    from hymoe.train.recipe import load_recipe

    if args.gpus < 1:
        _fail(f"--gpus: must be ≥ 1, got {args.gpus}")
    pins = _pins(args.overrides)
    # Pinned axes filter the search; they do not go into the recipe.
    overrides = [o for o in args.overrides
                 if not (o.startswith("parallel.") and o.split("=")[0].split(".", 1)[1] in AXES)]
    try:
        try:
            cfg = load_recipe(args.recipe, overrides)
        except ConfigError as e:
            if not str(e).startswith("data.path"):
                raise
            # Planning reads no data.
            cfg = load_recipe(args.recipe, overrides + ["data.path=unused"])
        cfg.model.validate()
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    note = None
    if args.seq_len:
        if args.seq_len > cfg.model.max_sequence_length:
            _fail(f"--seq-len: {args.seq_len} exceeds model.max_sequence_length="
                  f"{cfg.model.max_sequence_length}")
        if not any(o.startswith("train.global_batch=") for o in overrides):
            tokens = cfg.train.global_batch * cfg.train.seq_len
            cfg.train.global_batch = max(1, tokens // args.seq_len)
            note = (f"global batch {cfg.train.global_batch}: the recipe's {tokens:,} tokens per "
                    f"step at seq_len {args.seq_len:,} (set train.global_batch= to change)")
        cfg.train.seq_len = args.seq_len
    hw = gpu(args.gpu)
    result = plan(cfg, args.gpus, hw)
    result.context["global_batch_note"] = note
    chosen = [(i + 1, q) for i, q in enumerate(result.plans) if _matches(q, pins)][:args.top]
    for _, q in chosen:
        annotate(cfg, q, args.gpus, hw)
    if args.json:
        out = {"context": result.context, "refused": dict(result.rejected),
               "plans": [dict(rank=r, **q.to_json()) for r, q in chosen]}
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        print(render(result, args.top, pins))
    return 0

