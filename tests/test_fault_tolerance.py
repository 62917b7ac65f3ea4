"""Fault tolerance, end to end through `hymoe train`: SIGKILL in the middle of a save (synchronous
and asynchronous), a corrupted checkpoint file, missing checkpoints under each resume mode, NaN
losses, and SIGTERM (preemption)."""

import json
import signal
import subprocess
import sys
import time

import pytest
from helpers import hymoe

ARGS = ["optim.warmup_steps=1", "logging.progress=false", "logging.wandb=disabled",
        "train.global_batch=2", "train.micro_batch=2", "train.seq_len=32", "checkpoint.keep_last=0"]


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_during_save_keeps_previous_checkpoint(demo_data, tmp_path):
    run = tmp_path / "run"
    common = [*ARGS, "train.steps=4", "checkpoint.interval=2", f"run.dir={run}", f"data.path={demo_data}"]
    r = hymoe("train", "tiny", *common, env={"HYMOE_FAULTS": "kill_in_save@4"})
    assert r.returncode == -signal.SIGKILL
    ck = run / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000002"
    assert (ck / "step_00000004.tmp").exists() and not (ck / "step_00000004").exists()
    r = hymoe("train", "tiny", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "step_00000002" in r.stdout
    assert (ck / "latest").read_text() == "step_00000004"


def test_sigkill_while_async_save_pending_keeps_previous_checkpoint(demo_data, tmp_path):
    """checkpoint.async_save: the process dies (with the background writer) at the end of step 5
    while the step-4 save is still pending; the step-2 checkpoint stays `latest` and resumes."""
    run = tmp_path / "run"
    common = [*ARGS, "train.steps=6", "checkpoint.interval=2", "checkpoint.async_save=true",
              f"run.dir={run}", f"data.path={demo_data}"]
    r = hymoe("train", "tiny", *common, env={"HYMOE_FAULTS": "kill_in_async_save@4"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert "step_00000004 in the background" in r.stdout
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5]  # step 5 ran during the save
    ck = run / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000002"
    assert (ck / "step_00000004.tmp").exists() and not (ck / "step_00000004").exists()
    r = hymoe("train", "tiny", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "step_00000002" in r.stdout
    assert (ck / "latest").read_text() == "step_00000006"
    assert not (ck / "step_00000004.tmp").exists()  # the resumed run wrote step 4 anew


@pytest.fixture(scope="module")
def four_steps(demo_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ck") / "run"
    r = hymoe("train", "tiny", *ARGS, "train.steps=6", "train.exit_at_step=4", "checkpoint.interval=2",
              f"run.dir={run}", f"data.path={demo_data}")
    assert r.returncode == 0, r.stderr[-2000:]
    return run


def test_flipped_byte_is_detected_and_fallback_resumes_earlier(four_steps, demo_data, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(four_steps, run)
    shard = max((run / "checkpoints" / "step_00000004").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    common = [*ARGS, "train.steps=6", f"run.dir={run}", f"data.path={demo_data}"]
    r = hymoe("train", "tiny", *common)
    assert r.returncode == 1
    err = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(err) == 1 and shard.name in err[0] and "sha256 mismatch" in err[0], r.stderr[-2000:]
    assert "checkpoint.fallback=true" in err[0]
    r = hymoe("train", "tiny", *common, "checkpoint.fallback=true")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "step_00000002" in r.stdout


def test_resume_modes_without_checkpoint(demo_data, tmp_path):
    common = [*ARGS, "train.steps=2", f"data.path={demo_data}"]
    r = hymoe("train", "tiny", *common, "train.resume=required", f"run.dir={tmp_path / 'a'}")
    assert r.returncode == 2 and "train.resume: required" in r.stderr
    r = hymoe("train", "tiny", *common, "train.resume=auto", f"run.dir={tmp_path / 'b'}")
    assert r.returncode == 0 and "resumed from" not in r.stdout
    assert [m["step"] for m in metrics(tmp_path / "b")] == [1, 2]
    r = hymoe("train", "tiny", *common, "train.resume=never", f"run.dir={tmp_path / 'b'}")
    assert r.returncode == 2 and "train.resume: never" in r.stderr


def test_nan_step_is_skipped_then_repeated_nans_stop(demo_data, tmp_path):
    common = [*ARGS, "train.steps=5", f"data.path={demo_data}", "checkpoint.save_final=false"]
    r = hymoe("train", "tiny", *common, f"run.dir={tmp_path / 'a'}", env={"HYMOE_FAULTS": "nan_loss@3"})
    assert r.returncode == 0, r.stderr[-2000:]
    m = metrics(tmp_path / "a")
    assert [x["skipped"] for x in m] == [False, False, True, False, False]
    assert m[2]["data_position"] is not None and m[3]["loss"] == m[3]["loss"]  # finite after the skip
    r = hymoe("train", "tiny", *common, "train.nan_patience=2", f"run.dir={tmp_path / 'b'}",
              env={"HYMOE_FAULTS": "nan_loss@2,nan_loss@3"})
    assert r.returncode == 1
    assert "FloatingPointError" in r.stderr and "steps [2, 3]" in r.stderr, r.stderr[-2000:]


def test_sigterm_saves_and_exits(demo_data, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hymoe", "train", "tiny", *ARGS, "train.steps=500",
         f"run.dir={run}", f"data.path={demo_data}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        f = run / "metrics.jsonl"
        if f.exists() and len(f.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "stop requested (signal SIGTERM)" in out
    last = metrics(run)[-1]["step"]
    assert 3 <= last < 500
    assert (run / "checkpoints" / "latest").read_text() == f"step_{last:08d}"
