"""``hymoe model info`` and ``hymoe precision show``: answers from the config, no model built."""

from __future__ import annotations

import json

from hymoe.model.counting import count_params, linear_layer_names
from hymoe.model.pattern import NAMES
from hymoe.precision.policy import decide, layer_index
from hymoe.train.config import ConfigError
from hymoe.train.recipe import load_recipe


def _vocab(cfg) -> int:
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    try:
        from hymoe.data import load_manifest

        return load_manifest(cfg.data.path)["tokenizer"]["vocab_size"]
    except Exception:  # noqa: BLE001 - info must work before data exists
        return cfg.data.demo_vocab_size


def model_info(recipe: str, overrides: list[str], as_json: bool = False) -> str:
    cfg = load_recipe(recipe, overrides)
    try:
        cfg.model.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    vocab = _vocab(cfg)
    total = count_params(cfg.model, vocab)
    active = count_params(cfg.model, vocab, active=True)
    info = {
        "recipe": recipe, "pattern": cfg.model.pattern, "num_layers": cfg.model.num_layers,
        "layers": {NAMES[s]: cfg.model.layer_pattern.count(s) for s in NAMES},
        "vocab_size": vocab, "hidden_size": cfg.model.hidden_size,
        "params_total": total["total"], "params_active": active["total"],
        "params_active_without_input_embedding": active["total"] - total["embedding"],
        "params_mtp": total["mtp"], "params_active_mtp": active["mtp"],
        "params_embedding": total["embedding"], "params_output": total["output"],
        "params_by_layer_type": {NAMES[s]: n for s, n in total["by_type"].items()},
    }
    if as_json:
        return json.dumps(info, indent=1)
    lines = [
        f"{recipe}: {cfg.model.pattern}",
        "  layers: " + ", ".join(f"{n} {k}" for k, n in info["layers"].items() if n),
        f"  parameters: {info['params_total'] / 1e6:,.2f}M total, {info['params_active'] / 1e6:,.2f}M active per token"
        + (f" (MTP layer: {info['params_mtp'] / 1e6:,.2f}M, {info['params_active_mtp'] / 1e6:,.2f}M active)"
           if info["params_mtp"] else ""),
    ]
    for k, n in info["params_by_layer_type"].items():
        lines.append(f"    {k:10s} {n / 1e6:>12,.2f}M")
    lines.append(f"    embedding  {total['embedding'] / 1e6:>12,.2f}M   output {total['output'] / 1e6:,.2f}M")
    return "\n".join(lines)


def precision_table(recipe: str, overrides: list[str]) -> str:
    cfg = load_recipe(recipe, overrides)
    try:
        cfg.precision.validate()
        cfg.model.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    import re

    rows, seen = [], {}
    for name in linear_layer_names(cfg.model):
        fmt, why = decide(name, layer_index(name), cfg.model.num_layers, cfg.precision)
        # One line for all experts of a layer that share a format (Super has 512 per layer).
        grouped = re.sub(r"local_experts\.\d+\.", "local_experts.*.", name)
        if grouped != name:
            if (grouped, fmt, why) in seen:
                seen[(grouped, fmt, why)] += 1
                continue
            seen[(grouped, fmt, why)] = 1
        rows.append((grouped, fmt, why))
    rows = [(n + (f" (×{seen[(n, f, w)]})" if (n, f, w) in seen else ""), f, w) for n, f, w in rows]
    width = max(len(r[0]) for r in rows)
    out = [f"{recipe}: precision recipe {cfg.precision.recipe}", f"{'module':{width}s}  format  rule"]
    out += [f"{n:{width}s}  {f:6s}  {w}" for n, f, w in rows]
    counts = {}
    for n, f, w in rows:
        counts[f] = counts.get(f, 0) + seen.get((n.split(" (×")[0], f, w), 1)
    out.append("totals: " + ", ".join(f"{f} {n}" for f, n in counts.items()))
    return "\n".join(out)
