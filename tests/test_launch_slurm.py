"""`hymoe launch slurm` under a real Slurm: a one-node cluster on this machine
(tests/slurm/start_cluster.sh; .ci/run installs and starts it). The tiny recipe on 2 CPU tasks
trains and checkpoints; a job requeued in the middle (from outside with `scontrol requeue`, then by
its own script after the preemption warning USR1) resumes and ends with the same losses as the job
that ran straight through; a sweep submits one job per point.

Skipped, with the reason, where Slurm is not installed or the cluster cannot be started.
"""

import json
import re
import shutil
import subprocess
import time

import pytest
from helpers import REPO, hymoe

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

START = REPO / "tests" / "slurm" / "start_cluster.sh"
# 40 steps of the tiny recipe on 2 tasks (~0.3 s a step on 2 cores), a checkpoint every 10.
STEPS = 40
TRAIN = [f"train.steps={STEPS}", "checkpoint.interval=10", "logging.progress=false",
         "logging.wandb=disabled", "data.prepare_demo_if_missing=false"]
CPU2 = ["--gpus-per-node", "0", "--ntasks-per-node", "2"]
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("sbatch") is None:
        pytest.skip("Slurm is not installed (apt-get install slurmctld slurmd slurm-client munge; "
                    "bash tests/slurm/start_cluster.sh --install does both)")
    r = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=120,
                       check=False)
    if r.returncode != 0:
        pytest.skip(f"the local Slurm cluster did not start: {(r.stderr or r.stdout).strip()}")


def submit(*args) -> tuple[list[str], str]:
    """`hymoe launch slurm ARGS`; returns the job ids and the output."""
    r = hymoe("launch", "slurm", *args, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return re.findall(r"submitted job (\d+)", r.stdout), r.stdout


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                         check=False).stdout
    m = re.search(r"JobState=(\S+)", out)
    return m.group(1) if m else "UNKNOWN"


def wait_until(cond, what: str, timeout: float = 240, log=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def wait_done(job: str, log) -> None:
    wait_until(lambda: job_state(job) in DONE, f"job {job} to end", log=log)
    assert job_state(job) == "COMPLETED", log.read_text()[-4000:]


def losses(run) -> dict[int, float]:
    """step → loss; after a resume the repeated steps' later lines win."""
    f = run / "metrics.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []
    return {m["step"]: m["loss"] for m in rows}


@pytest.fixture(scope="module")
def straight(cluster, demo_data, tmp_path_factory):
    """The tiny recipe on 2 CPU tasks, start to end without interruption."""
    run = tmp_path_factory.mktemp("slurm") / "straight"
    (job,), out = submit("tiny", *CPU2, *TRAIN, f"run.dir={run}", f"data.path={demo_data}")
    log = run / f"slurm-{job}.out"
    assert f"log     {log}" in out and f"run     {run}" in out
    wait_done(job, log)
    return run, log


def test_job_trains_and_checkpoints(straight):
    run, log = straight
    curve = losses(run)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert curve[STEPS] < curve[1] - 1.0  # it learns
    assert (run / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    text = log.read_text()
    assert "start-up diagnostics" in text and "world 2 = dp 2" in text and "SLURM_JOB_ID=" in text
    assert (run / "launch.sbatch").exists()


def test_requeued_job_resumes_and_matches(straight, demo_data, tmp_path):
    run = tmp_path / "requeued"
    (job,), _ = submit("tiny", *CPU2, *TRAIN, f"run.dir={run}", f"data.path={demo_data}")
    log = run / f"slurm-{job}.out"

    # 1. From outside, after the step-10 checkpoint: Slurm sends TERM to every process and requeues.
    wait_until(lambda: max(losses(run), default=0) >= 12, "step 12", log=log)
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_until(lambda: "resumed from" in log.read_text(), "the first resume", log=log)
    first = re.findall(r"resumed from \S+step_(\d+) at step (\d+)", log.read_text())
    assert len(first) == 1 and 10 <= int(first[0][1]) < STEPS, log.read_text()[-3000:]

    # 2. The preemption warning (--signal=B:USR1@…, sent here at once): the script has the tasks
    # checkpoint, then requeues the job itself.
    seen = len((run / "metrics.jsonl").read_text().splitlines())
    wait_until(lambda: len((run / "metrics.jsonl").read_text().splitlines()) >= seen + 2,
               "two steps after the resume", log=log)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_until(lambda: log.read_text().count("resumed from") >= 2, "the second resume", timeout=180, log=log)
    wait_done(job, log)

    text = log.read_text()
    assert "hymoe: USR1: checkpointing, then requeueing" in text and "hymoe: requeueing job" in text
    assert "stop requested (signal SIGUSR1)" in text
    starts = re.findall(r"hymoe: job \d+ start (\d+)", text)
    assert starts == ["1", "2", "3"], starts
    resumed = [int(s) for _, s in re.findall(r"resumed from \S+step_(\d+) at step (\d+)", text)]
    assert len(resumed) == 2 and resumed[0] < resumed[1] < STEPS
    # The save on stop completed (megatron's writer processes survive Slurm's signal).
    assert "BrokenPipeError" not in text and "Traceback" not in text, text[-3000:]
    # Every step once, and the same losses as the uninterrupted job (resume is exact).
    straight_run, _ = straight
    assert losses(run) == losses(straight_run)
    assert (run / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"


def test_sweep_submits_one_job_per_point(cluster, demo_data, tmp_path):
    sweep = tmp_path / "sweep"
    jobs, out = submit("tiny", "-m", "optim.lr=1e-3,3e-3", "--gpus-per-node", "0",
                       "--ntasks-per-node", "1", "train.steps=2", "optim.warmup_steps=1", "train.global_batch=4",
                       "train.micro_batch=2", "train.seq_len=64", "logging.progress=false",
                       "logging.wandb=disabled", "data.prepare_demo_if_missing=false",
                       f"run.dir={sweep}", f"data.path={demo_data}")
    assert len(jobs) == 2 and "multirun: 2 jobs" in out
    for i, (job, lr) in enumerate(zip(jobs, (0.001, 0.003))):
        run = sweep / str(i)
        wait_done(job, run / f"slurm-{job}.out")
        assert sorted(losses(run)) == [1, 2]
        assert f"lr: {lr}" in (run / "config.yaml").read_text()
