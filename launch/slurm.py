"""Slurm: the sbatch script for one training run, and its submission.

The script starts one task per GPU with ``srun`` (one per ``--ntasks-per-node`` on CPU nodes); each
task sets torchrun's variables from Slurm's (RANK ← SLURM_PROCID, LOCAL_RANK ← SLURM_LOCALID,
WORLD_SIZE ← SLURM_NTASKS; MASTER_ADDR is the first node of the allocation), which is all that
``hymoe.parallel.setup.init_distributed`` reads. No torchrun runs inside the job: Slurm already
starts, signals and ends every process.

Preemption and time limits. ``--signal=B:USR1@S`` makes Slurm send USR1 to the batch script S
seconds before the time limit; the script passes it to srun, which forwards it to every task; the
trainer finishes its step, saves a checkpoint and exits 0; the script then requeues the job
(``scontrol requeue``). The job starts again from the top with the same ``run.dir`` and
``train.resume=auto``, so it continues from that checkpoint; the log is appended to
(``--open-mode=append``). When Slurm itself ends the job (``scancel``, ``scontrol requeue``,
preemption by a higher-priority job), every task gets SIGTERM, saves the same way, and Slurm
decides whether the job comes back.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from hymoe.launch.job import Job

SCRIPT_NAME = "launch.sbatch"


class SlurmError(RuntimeError):
    """sbatch is missing or refused the job; the message is one line."""


@dataclass
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 8
    ntasks_per_node: int = 8  # one per GPU; on CPU nodes, the processes per node
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    job_name: str | None = None
    signal_seconds: int = 120
    chdir: str = "."
    python: str = "python"
    container_image: str | None = None
    container_mounts: str | None = None
    container_workdir: str | None = None
    env: list[str] = field(default_factory=list)  # KEY=VALUE exported in the script
    sbatch_args: list[str] = field(default_factory=list)  # more #SBATCH lines, verbatim
    command: str = ""  # the `hymoe launch slurm ...` line that wrote the script, for its header

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


def log_path(job: Job) -> str:
    """The job's log (``%j``: Slurm's job id); the same file across requeues."""
    return str(job.run_dir / "slurm-%j.out")


def _q(word: str) -> str:
    return shlex.quote(str(word))


def render(job: Job, opt: SlurmOptions) -> str:
    """The sbatch script (bash) for ``job`` under ``opt``."""
    hw = f"{opt.gpus_per_node} GPUs" if opt.gpus_per_node else f"{opt.ntasks_per_node} CPU processes"
    name = opt.job_name or f"hymoe-{job.recipe}"
    sb = [
        f"--job-name={name}",
        f"--nodes={opt.nodes}",
        f"--ntasks-per-node={opt.ntasks_per_node}",
    ]
    if opt.gpus_per_node:
        sb.append(f"--gpus-per-node={opt.gpus_per_node}")
    if opt.cpus_per_task:
        sb.append(f"--cpus-per-task={opt.cpus_per_task}")
    for flag in ("partition", "account", "time"):
        if getattr(opt, flag):
            sb.append(f"--{flag}={getattr(opt, flag)}")
    sb += [
        f"--chdir={opt.chdir}",
        f"--output={log_path(job)}",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{opt.signal_seconds}",
        *opt.sbatch_args,
    ]
    lines = [
        "#!/bin/bash",
        f"# hymoe: {job.recipe} on {opt.nodes} node{'s' if opt.nodes > 1 else ''} × {hw} = {job.world_size} ranks.",
        f"# Written by: {opt.command}" if opt.command else "# Written by hymoe launch slurm.",
        "# `sbatch` this file again to continue the run: it resumes from its newest checkpoint.",
        *(f"#SBATCH {a}" for a in sb),
        "",
        "set -uo pipefail",
        "",
        "# Rendezvous: rank 0 runs on the allocation's first node; the port follows the job id so that",
        "# jobs sharing a node do not collide.",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
    ]
    for kv in opt.env:
        key, _, value = kv.partition("=")
        lines.append(f"export {key}={_q(value)}")
    cmd = [opt.python, "-m", "hymoe", *job.train_argv()]
    srun = ["srun --kill-on-bad-exit=1"]
    if opt.cpus_per_task:
        # srun does not take --cpus-per-task from the allocation in every Slurm release.
        srun.append(f"--cpus-per-task={opt.cpus_per_task}")
    if opt.container_image:
        srun.append(f"--container-image={_q(opt.container_image)}")
        if opt.container_mounts:
            srun.append(f"--container-mounts={_q(opt.container_mounts)}")
        srun.append(f"--container-workdir={_q(opt.container_workdir or opt.chdir)}")
    srun.append(
        "bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; "
        "exec \"$@\"' hymoe-task \"${cmd[@]}\" &"
    )
    lines += [
        "",
        "# What every task runs (torchrun's variables are set per task from Slurm's, in srun below).",
        "cmd=(" + " ".join(_q(w) for w in cmd) + ")",
        "",
        ('echo "hymoe: job $SLURM_JOB_ID start $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST,'
         ' rendezvous $MASTER_ADDR:$MASTER_PORT"'),
        "",
        "# USR1 (sent --signal seconds before the time limit): have every task checkpoint and exit,",
        "# then requeue. TERM (scancel, scontrol requeue, preemption): Slurm signals every process of",
        "# the job itself and decides about the requeue; wait for the tasks to finish saving.",
        'preempted=0 srun_pid=""',
        ("trap 'preempted=1; echo \"hymoe: USR1: checkpointing, then requeueing\"; "
         "kill -USR1 \"$srun_pid\" 2>/dev/null' USR1"),
        "trap 'echo \"hymoe: TERM: the tasks save a checkpoint and stop\"' TERM",
        "",
        " \\\n    ".join(srun),
        "srun_pid=$!",
        "# A trapped signal interrupts `wait`; wait until srun has really ended, then take its status.",
        'while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done',
        'wait "$srun_pid"; rc=$?',
        "",
        "# Requeue after a USR1 even if a task failed while stopping: the next start resumes from the",
        "# newest complete checkpoint, which is at worst the last periodic one.",
        "if (( preempted )); then",
        '    echo "hymoe: requeueing job $SLURM_JOB_ID (tasks exited with $rc)"',
        '    scontrol requeue "$SLURM_JOB_ID" || {',
        f'        echo "hymoe: requeue failed; sbatch {_q(job.run_dir / SCRIPT_NAME)} continues the run" >&2; exit 1; }}',
        "fi",
        "exit $rc",
        "",
    ]
    return "\n".join(lines)


def submit(job: Job, opt: SlurmOptions, sbatch: str = "sbatch") -> tuple[str, Path]:
    """Write the script into the run folder and ``sbatch`` it; return (job id, script path)."""
    import shutil

    if shutil.which(sbatch) is None:
        raise SlurmError(f"{sbatch} not found: submit from a Slurm login node, or use --dry-run to see the script")
    job.run_dir.mkdir(parents=True, exist_ok=True)  # the log goes there from the first second
    script = job.run_dir / SCRIPT_NAME
    script.write_text(render(job, opt))
    r = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        msg = " ".join(r.stderr.split()) or f"exit {r.returncode}"
        raise SlurmError(f"sbatch refused {script}: {msg}")
    job_id = r.stdout.strip().split(";")[0]  # --parsable: "<id>[;<cluster>]"
    return job_id, script
