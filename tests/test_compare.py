"""`hymoe compare`: final-loss gap, plot, --max-gap exit code, and resumed runs' duplicate steps."""

import json
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


def test_config_differences_and_real_runs(demo_data, tmp_path):
    """Two real short runs that differ in precision: the report names precision.recipe."""
    from helpers import hymoe

    runs = []
    for p in ("bf16", "nvfp4"):
        run = tmp_path / p
        r = hymoe("train", "tiny", f"precision={p}", "train.steps=6", "optim.warmup_steps=1",
                  "train.global_batch=2", "train.micro_batch=2", "train.seq_len=32",
                  "logging.progress=false", "logging.wandb=disabled", "checkpoint.save_final=false",
                  f"run.dir={run}", f"data.path={demo_data}")
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(str(run))
    s = compare_runs(runs, tmp_path / "cmp")
    assert "precision.recipe" in s["config_differences"]
    assert s["config_differences"]["precision.recipe"] == ["bf16", "nvfp4"]
    assert abs(s["runs"][1]["gap_pct"]) < 5


def test_cli_max_gap_exit_code(tmp_path):
    base = _run(tmp_path, "a", [3.0] * 10)
    other = _run(tmp_path, "b", [3.3] * 10)
    cmd = [sys.executable, "-m", "hymoe", "compare", str(base), str(other), "--out", str(tmp_path)]
    assert subprocess.run(cmd + ["--max-gap", "15"], capture_output=True).returncode == 0
    r = subprocess.run(cmd + ["--max-gap", "5"], capture_output=True, text=True)
    assert r.returncode == 1 and "exceeds --max-gap" in r.stderr
