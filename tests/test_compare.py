"""`hymoe compare`: final-loss gap, plot, --max-gap exit code, resumed runs' duplicate steps, and
runs read from wandb's offline files."""

import json
import os
import subprocess
import sys

from hymoe.train.compare import compare_runs, read_metrics


def _run(tmp_path, name, losses, dup_last=False):
    d = tmp_path / name
    d.mkdir()
    rows = [{"step": i + 1, "loss": x, "lr": 1e-3, "tokens": 10 * (i + 1), "grad_norm": 1.0}
            for i, x in enumerate(losses)]
    if dup_last:  # a resume re-logs the step it restarted from
        rows.append(dict(rows[-1], loss=losses[-1]))
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def test_gap_and_plot(tmp_path):
    base = _run(tmp_path, "bf16", [5.0] * 10 + [4.0] * 10)
    fp4 = _run(tmp_path, "nvfp4", [5.0] * 10 + [4.04] * 10, dup_last=True)
    s = compare_runs([str(base), str(fp4)], tmp_path / "out")
    assert abs(s["runs"][1]["gap_pct"] - 1.0) < 1e-9
    assert s["runs"][0]["gap_pct"] == 0.0
    assert (tmp_path / "out" / "loss_curves.png").stat().st_size > 10_000
    report = (tmp_path / "out" / "report.html").read_text()
    assert "data:image/png;base64," in report and "+1.00%" in report
    assert len(read_metrics(fp4)) == 20


def test_validation_losses_are_compared_when_every_run_has_them(tmp_path):
    base = _run(tmp_path, "bf16", [5.0] * 10)
    fp4 = _run(tmp_path, "nvfp4", [5.0] * 10)
    for d, val in ((base, [4.5, 4.0]), (fp4, [4.6, 4.08])):  # at steps 5 and 10
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        rows[4]["val/loss"], rows[9]["val/loss"] = val
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = compare_runs([str(base), str(fp4)], tmp_path / "out")
    assert s["runs"][1]["val_loss"] == 4.08 and abs(s["runs"][1]["val_gap_pct"] - 2.0) < 1e-9
    assert "validation 4.080 (+2.00%)" in s["lines"][1]
    assert "+2.00%" in (tmp_path / "out" / "report.html").read_text()
    assert s["max_gap_pct"] == 0.0  # --max-gap stays on the training loss
    assert abs(s["max_val_gap_pct"] - 2.0) < 1e-9  # --max-val-gap reads this
    cmd = [sys.executable, "-m", "hymoe", "compare", str(base), str(fp4), "--out", str(tmp_path)]
    assert subprocess.run(cmd + ["--max-val-gap", "2.5"], capture_output=True).returncode == 0
    r = subprocess.run(cmd + ["--max-val-gap", "1.5"], capture_output=True, text=True)
    assert r.returncode == 1 and "exceeds --max-val-gap" in r.stderr
    # A run without validation gets no validation numbers.
    plain = _run(tmp_path, "plain", [5.0] * 10)
    s = compare_runs([str(base), str(plain)], tmp_path / "out2")
    assert "val_loss" not in s["runs"][1] and s["max_val_gap_pct"] is None
    r = subprocess.run([sys.executable, "-m", "hymoe", "compare", str(base), str(plain), "--out",
                        str(tmp_path / "out3"), "--max-val-gap", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "--max-val-gap" in r.stderr


def test_config_differences_and_real_runs_from_metrics_and_wandb(demo_data, tmp_path):
    """Two real short runs that differ in precision, logged to metrics.jsonl and to wandb offline:
    the report names precision.recipe, and reading the runs from their wandb files alone (a wandb
    run folder; a run directory holding only wandb/) gives the same curves and differences."""
    import shutil

    from helpers import hymoe

    runs = []
    for p in ("bf16", "nvfp4"):
        run = tmp_path / p
        r = hymoe("train", "tiny", f"precision={p}", "train.steps=6", "optim.warmup_steps=1",
                  "train.global_batch=2", "train.micro_batch=2", "train.seq_len=32",
                  "logging.progress=false", "logging.wandb=offline", "checkpoint.save_final=false",
                  f"run.dir={run}", f"data.path={demo_data}")
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(run)
    s = compare_runs([str(r) for r in runs], tmp_path / "cmp")
    assert "precision.recipe" in s["config_differences"]
    assert s["config_differences"]["precision.recipe"] == ["bf16", "nvfp4"]
    assert abs(s["runs"][1]["gap_pct"]) < 5

    folder = next((runs[0] / "wandb").glob("offline-run-*"))
    wandb_only = tmp_path / "nvfp4_wandb_only"
    shutil.copytree(runs[1] / "wandb", wandb_only / "wandb")  # no metrics.jsonl, no config.yaml
    for run, wandb_run in ((runs[0], folder), (runs[1], wandb_only)):
        want, got = read_metrics(run), read_metrics(wandb_run)
        assert [(m["step"], m["tokens"], m["loss"], m["grad_norm"]) for m in want] == \
               [(m["step"], m["tokens"], m["loss"], m["grad_norm"]) for m in got]
    w = compare_runs([str(folder), str(wandb_only)], tmp_path / "cmp_wandb")
    for a, b in zip(s["runs"], w["runs"]):
        assert (a["steps"], a["first_loss"], a["final_loss"], a["gap_pct"]) == \
               (b["steps"], b["first_loss"], b["final_loss"], b["gap_pct"])
    # config.yaml two folders up for the first, the config wandb logged for the second
    assert w["config_differences"]["precision.recipe"] == ["bf16", "nvfp4"]
    assert "(nvfp4)" in w["lines"][1]


def test_wandb_reader_reads_records_across_blocks(tmp_path):
    """wandb's own writer: 300 history rows (over 32 KiB blocks) and a config record larger
    than a block (split into first/middle/last chunks) all come back."""
    script = tmp_path / "log.py"
    script.write_text(
        "import wandb\n"
        f"r = wandb.init(project='p', dir={str(tmp_path)!r}, mode='offline',"
        " config={'note': 'x' * 100_000, 'nested': {'a': 1}})\n"
        "for s in range(1, 301):\n"
        "    r.log({'step': s, 'loss': 1.0 / s, 'tokens': 64 * s,"
        " **{f'pad/{i}': float(i) for i in range(20)}}, step=s)\n"
        "r.finish()\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, WANDB_SILENT="true", WANDB_MODE="offline"))
    assert r.returncode == 0, r.stderr[-2000:]
    from hymoe.train.wandb_reader import read_run, run_folders

    (folder,) = run_folders(tmp_path)
    assert next(folder.glob("*.wandb")).stat().st_size > 4 * 32768
    rows, config, _ = read_run(folder)
    assert [x["step"] for x in rows] == list(range(1, 301))
    assert rows[-1]["loss"] == 1.0 / 300 and rows[-1]["pad/19"] == 19.0
    assert config["note"] == "x" * 100_000 and config["nested"] == {"a": 1}
    rows = read_metrics(tmp_path)  # a folder holding only wandb/
    assert len(rows) == 300 and rows[9]["tokens"] == 640


def test_missing_run_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hymoe", "compare", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "neither metrics.jsonl nor a wandb run" in lines[0], r.stderr


def test_cli_max_gap_exit_code(tmp_path):
    base = _run(tmp_path, "a", [3.0] * 10)
    other = _run(tmp_path, "b", [3.3] * 10)
    cmd = [sys.executable, "-m", "hymoe", "compare", str(base), str(other), "--out", str(tmp_path)]
    assert subprocess.run(cmd + ["--max-gap", "15"], capture_output=True).returncode == 0
    r = subprocess.run(cmd + ["--max-gap", "5"], capture_output=True, text=True)
    assert r.returncode == 1 and "exceeds --max-gap" in r.stderr


def test_plot_has_labelled_axes_legend_and_gap_panel(tmp_path, monkeypatch):
    """What loss_curves.png shows, read from the figure compare_runs saves: the curves panel with a
    legend naming each run, and the gap panel below it (a zero line plus one curve per run) whose
    last point is the gap of the second run."""
    import matplotlib.figure

    saved = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (saved.append(fig), real(fig, *a, **k))[1])
    base = _run(tmp_path, "bf16", [5.0] * 20)
    fp4 = _run(tmp_path, "nvfp4", [5.05] * 20)
    compare_runs([str(base), str(fp4)], tmp_path / "out")
    (fig,) = saved
    curves, gap = fig.axes
    assert curves.get_ylabel() == "loss" and gap.get_xlabel() == "tokens consumed"
    assert "gap" in gap.get_ylabel()
    assert [t.get_text() for t in curves.get_legend().get_texts()] == ["bf16", "nvfp4"]
    assert len(curves.get_lines()) == 4  # EMA and raw per run
    lines = [ln for ln in gap.get_lines() if len(ln.get_xdata()) > 2]
    assert len(lines) == 2 and abs(lines[1].get_ydata()[-1] - 1.0) < 1e-6
