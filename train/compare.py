"""Loss-curve comparison of runs (e.g. NVFP4 against BF16): a plot, an HTML report and a summary.

A run is a hymoe run directory (its ``metrics.jsonl``) or a Weights & Biases run read from its
local files (``hymoe.train.wandb_reader``): a wandb run folder, or a run directory that holds only
``wandb/`` (``logging.wandb=offline`` writes one). Runs are aligned by consumed tokens (runs with
different batch sizes compare fairly). The final loss of a run is the mean over its last 10% of
steps (single steps are noisy); the gap is relative to the first run given (the baseline), in
percent. Runs with validation (``train.eval_interval``) also get their last validation loss and its
gap (held-out batches, the same for every run), and their validation points on the plot. The
report lists the config keys in which runs differ.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    """One dict per optimizer step (``step``, ``loss``, ``tokens``, …), sorted by step: from
    ``metrics.jsonl`` if the run has one, else from its wandb run files."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return _read_wandb_metrics(Path(run_dir))
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
    return _last_per_step(rows)


def _last_per_step(rows: list[dict]) -> list[dict]:
    # A resumed run appends; keep the last record of each step.
    by_step = {r["step"]: r for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def _read_wandb_metrics(run_dir: Path) -> list[dict]:
    from hymoe.train.wandb_reader import read_run, run_folders

    folders = run_folders(run_dir)
    if not folders:
        raise FileNotFoundError(
            f"{run_dir}: neither metrics.jsonl nor a wandb run (wandb/offline-run-*/run-*.wandb); "
            "give a hymoe run directory or a wandb run folder"
        )
    rows = []
    for folder in folders:  # one per launch of a resumed run, oldest first
        for row in read_run(folder)[0]:
            if "loss" in row:
                rows.append(dict(row, step=row.get("step", row.get("_step"))))
    if not rows or "tokens" not in rows[0]:
        raise ValueError(
            f"{folders[-1]}: the wandb history has no `loss` and `tokens` (consumed tokens) to "
            "align runs by; hymoe logs both every step"
        )
    return _last_per_step(rows)


def _run_config(run_dir: Path) -> dict:
    """The resolved config of a run: its config.yaml — for a wandb run folder inside a hymoe run
    directory, that directory's — else the config the wandb run logged."""
    import yaml

    from hymoe.train.wandb_reader import read_run, run_folders

    folders = run_folders(run_dir)
    inside_run = folders == [run_dir] and run_dir.parent.name == "wandb"
    for d in (run_dir, run_dir.parent.parent) if inside_run else (run_dir,):
        f = d / "config.yaml"
        if f.is_file():
            return yaml.safe_load(f.read_text()) or {}
    return read_run(folders[-1])[1] if folders else {}


def tail_mean(values: list[float], fraction: float = 0.1) -> float:
    n = max(1, int(round(len(values) * fraction)))
    return sum(values[-n:]) / n


def ema(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (what loss-curve viewers call smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def _label(run_dir: Path) -> str:
    """The folder's name and the run's precision recipe (what comparisons are usually about)."""
    precision = _run_config(run_dir).get("precision")
    recipe = precision.get("recipe") if isinstance(precision, dict) else None
    return f"{run_dir.name} ({recipe})" if recipe else run_dir.name


def compare_runs(run_dirs: list[str], out_dir: str | Path) -> dict:
    """Write ``loss_curves.png`` and ``compare.json`` to ``out_dir``; return the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(Path(d), read_metrics(d)) for d in run_dirs]
    base_final = tail_mean([r["loss"] for r in runs[0][1]])
    summary = {"runs": [], "lines": [], "max_gap_pct": 0.0, "max_val_gap_pct": None}
    fig, (ax, axr) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=[3, 1.3])
    base_by_tokens = {r["tokens"]: r["loss"] for r in runs[0][1]}
    base_val = _last_val(runs[0][1])
    for d, rows in runs:
        losses = [r["loss"] for r in rows]
        final = tail_mean(losses)
        gap = 100.0 * (final - base_final) / base_final
        entry = {"run": str(d), "steps": len(rows), "first_loss": losses[0], "final_loss": final,
                 "gap_pct": gap}
        line_text = f"{_label(d):40s} loss {losses[0]:.3f} → {final:.3f} (last 10% mean)  gap {gap:+.2f}%"
        val = _last_val(rows)
        if val is not None and base_val is not None:
            entry.update(val_loss=val, val_gap_pct=100.0 * (val - base_val) / base_val)
            line_text += f"  validation {val:.3f} ({entry['val_gap_pct']:+.2f}%)"
        summary["runs"].append(entry)
        summary["max_gap_pct"] = max(summary["max_gap_pct"], abs(gap))
        summary["lines"].append(line_text)
        tokens = [r["tokens"] for r in rows]
        (line,) = ax.plot(tokens, ema(losses), label=_label(d), linewidth=1.4)
        ax.plot(tokens, losses, color=line.get_color(), alpha=0.2, linewidth=0.8)
        checked = [r for r in rows if "val/loss" in r]
        if checked:
            ax.plot([r["tokens"] for r in checked], [r["val/loss"] for r in checked], "o--",
                    color=line.get_color(), markersize=4, linewidth=0.9,
                    label=f"{_label(d)} validation")
        common = [t for t in tokens if t in base_by_tokens]
        rel = [100.0 * (r["loss"] - base_by_tokens[r["tokens"]]) / base_by_tokens[r["tokens"]]
               for r in rows if r["tokens"] in base_by_tokens]
        axr.plot(common, ema(rel), color=line.get_color(), linewidth=1.2)
    if all("val_gap_pct" in r for r in summary["runs"]):  # None: not every run validated
        summary["max_val_gap_pct"] = max(abs(r["val_gap_pct"]) for r in summary["runs"])
    ax.set_ylabel("loss")
    ax.set_title("loss curves (EMA 0.9 solid, raw faint, validation dashed)")
    ax.legend()
    ax.grid(alpha=0.3)
    axr.axhline(0, color="grey", linewidth=0.8)
    axr.set_ylabel("gap vs first, EMA (%)")
    axr.set_xlabel("tokens consumed")
    axr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)
    summary["config_differences"] = config_differences([d for d, _ in runs])
    (out / "compare.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "lines"}, indent=1))
    _write_html(out, summary)
    summary["lines"].append(f"plot: {out / 'loss_curves.png'}  report: {out / 'report.html'}")
    return summary


def _last_val(rows: list[dict]) -> float | None:
    """The run's last validation loss, if it ran validation."""
    checked = [r["val/loss"] for r in rows if "val/loss" in r]
    return checked[-1] if checked else None


def _flatten(node, prefix=""):
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def config_differences(run_dirs: list[Path]) -> dict:
    """{key: [value per run]} for every resolved-config key whose value differs between runs
    (run.* keys, which always differ, are left out)."""
    flats = [_flatten(_run_config(Path(d))) for d in run_dirs]
    keys = sorted(set().union(*flats))
    return {
        k: [f.get(k) for f in flats]
        for k in keys
        if not k.startswith("run.") and len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1
    }


def _write_html(out: Path, summary: dict) -> None:
    """A self-contained report: the plot inlined, the final-loss table, the config differences."""
    import base64
    import html

    png = base64.b64encode((out / "loss_curves.png").read_bytes()).decode()
    rows = "".join(
        f"<tr><td>{html.escape(r['run'])}</td><td>{r['steps']}</td><td>{r['first_loss']:.4f}</td>"
        f"<td>{r['final_loss']:.4f}</td><td>{r['gap_pct']:+.2f}%</td>"
        + (f"<td>{r['val_loss']:.4f}</td><td>{r['val_gap_pct']:+.2f}%</td>" if "val_loss" in r
           else "<td>–</td><td>–</td>") + "</tr>"
        for r in summary["runs"]
    )
    diffs = "".join(
        f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in vals) + "</tr>"
        for k, vals in summary["config_differences"].items()
    ) or "<tr><td colspan=9>none</td></tr>"
    (out / "report.html").write_text(f"""<!doctype html><meta charset="utf-8"><title>hymoe compare</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}td,th{{padding:2px 10px;text-align:left}}</style>
<h1>Loss-curve comparison</h1><img src="data:image/png;base64,{png}" width="100%">
<h2>Final loss (mean of the last 10% of steps)</h2>
<table><tr><th>run</th><th>steps</th><th>first loss</th><th>final loss</th><th>gap vs first</th><th>last validation loss</th><th>its gap</th></tr>{rows}</table>
<h2>Config differences</h2><table>{diffs}</table>
""")
