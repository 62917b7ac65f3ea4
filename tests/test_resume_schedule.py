"""Resuming with another LR schedule is never silent: a changed optim.lr (or any schedule key)
stops with the differences named, unless optim.override_schedule=true, which continues from the
checkpoint's step on the recipe's schedule (Megatron-LM's --override-opt_param-scheduler)."""

import json

from helpers import hymoe

COMMON = ["logging.progress=false", "logging.wandb=disabled", "train.global_batch=4",
          "train.micro_batch=4", "train.seq_len=64", "optim.schedule=constant",
          "optim.warmup_steps=0", "checkpoint.interval=2"]


def lrs(run):
    return [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_changed_schedule_on_resume(demo_data, tmp_path):
    run = tmp_path / "run"
    args = ["train", "tiny", *COMMON, f"run.dir={run}", f"data.path={demo_data}"]
    r = hymoe(*args, "train.steps=2", "optim.lr=1e-3")
    assert r.returncode == 0, r.stderr[-2000:]

    r = hymoe(*args, "train.steps=4", "optim.lr=3e-3")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()[-1]
    assert "optim.lr (max_lr 0.001 → 0.003)" in err and "optim.override_schedule=true" in err, err
    assert len(lrs(run)) == 2  # nothing trained

    r = hymoe(*args, "train.steps=4", "optim.lr=3e-3", "optim.override_schedule=true")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    assert lrs(run) == [1e-3, 1e-3, 3e-3, 3e-3]
