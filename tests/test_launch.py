"""`hymoe launch`: help and bad input, the generated sbatch scripts against goldens, sweeps, the
start-up diagnostics, and a real 2-process torchrun of the tiny recipe on CPU. Runs under a real
Slurm are in test_launch_slurm.py.

Regenerate the sbatch goldens deliberately with ``HYMOE_REGEN_GOLDEN=1 pytest tests/test_launch.py``
and say why in the commit.
"""

import json
import os
import subprocess

import pytest
from helpers import REPO, hymoe

from hymoe.cli import main

GOLDEN = REPO / "tests" / "golden"

# A 2-node × 8-GPU Nano job with a layout that fits 16 ranks; paths are fixed so the script is
# the same on every machine.
NANO_2X8 = ["nano_30b_a3b", "--nodes", "2", "--gpus-per-node", "8", "--partition", "batch",
            "--account", "llm", "--time", "04:00:00", "--cpus-per-task", "16",
            "--chdir", "/lustre/hymoe", "--env", "NCCL_IB_HCA=mlx5", "--sbatch-arg=--exclusive",
            "run.dir=/lustre/runs/nano", "parallel.tp=4", "parallel.ep=4",
            "data.path=/lustre/data/pretraining"]


def launch(capsys, *args):
    """`hymoe launch ARGS` in this process: (exit status, stdout, stderr)."""
    try:
        rc = main(["launch", *args])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- help and bad input ------------------------------------------------------------------------
@pytest.mark.parametrize("launcher, flags", [
    ("slurm", ["--nodes", "--gpus-per-node", "--ntasks-per-node", "--cpus-per-task", "--partition",
               "--account", "--time", "--job-name", "--signal-seconds", "--container-image",
               "--container-mounts", "--container-workdir", "--python", "--chdir", "--env",
               "--sbatch-arg", "--dry-run", "--multirun"]),
    ("torchrun", ["--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint", "--dry-run",
                  "--multirun"]),
])
def test_help_explains_every_flag(capsys, launcher, flags):
    from hymoe.launch import cli

    parser = {"slurm": cli.slurm_parser, "torchrun": cli.torchrun_parser}[launcher]()
    explained = {opt: a.help for a in parser._actions for opt in a.option_strings}
    rc, out, _ = launch(capsys, launcher, "--help")
    assert rc == 0 and "examples:" in out
    for flag in flags:
        assert flag in out and len((explained[flag] or "").split()) >= 4, flag
    rc, out, _ = launch(capsys, "--help")
    assert rc == 0 and "torchrun" in out and "slurm" in out and "docs/launch.md" in out


@pytest.mark.parametrize("args, names", [
    (["slurm", "tiny", "--nodes", "0"], "--nodes"),
    (["slurm"], "RECIPE"),
    (["slurm", "nope"], "recipe 'nope' not found"),
    (["slurm", "tiny", "--gpus-per-node", "8", "--ntasks-per-node", "4"], "--ntasks-per-node"),
    (["slurm", "tiny", "--gpus-per-node", "0", "--ntasks-per-node", "3", "parallel=tp2"], "parallel.tp"),
    (["slurm", "tiny", "--env", "NOEQUALS"], "--env"),
    (["slurm", "tiny", "--container-mounts", "/a:/a"], "--container-image"),
    (["slurm", "tiny", "--nodse", "2"], "--nodse"),
    (["slurm", "tiny", "train.stepz=3", "--gpus-per-node", "1"], "train.stepz"),
    (["torchrun", "tiny", "--nproc-per-node", "0"], "--nproc-per-node"),
    (["torchrun", "tiny", "--nnodes", "2", "--rdzv-endpoint", "n0:29500", "run.dir=/x"], "--node-rank"),
    (["torchrun", "tiny", "--nnodes", "2", "--node-rank", "0", "run.dir=/x"], "--rdzv-endpoint"),
    (["torchrun", "tiny", "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "n0:1"], "run.dir"),
    (["torchrun", "tiny", "--rdzv-endpoint", "n0"], "--rdzv-endpoint"),
    (["bogus"], "unknown launcher 'bogus'"),
])
def test_bad_input_fails_with_one_line_naming_the_flag(capsys, args, names):
    rc, out, err = launch(capsys, *args)
    assert rc == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and names in lines[0], err
    assert "Traceback" not in err + out


def test_without_sbatch_says_so(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    rc, _, err = launch(capsys, "slurm", "tiny", "--gpus-per-node", "1", f"run.dir={tmp_path}/r")
    assert rc == 1 and err.count("\n") == 1 and "sbatch not found" in err and "--dry-run" in err


# -- sbatch scripts ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, extra", [
    ("sbatch_2x8.sh", ["--python", "/lustre/hymoe/.venv/bin/python"]),
    ("sbatch_2x8_container.sh", ["--container-image", "/lustre/images/hymoe+25.11.sqsh",
                                 "--container-mounts", "/lustre:/lustre"]),
])
def test_sbatch_script_golden(capsys, name, extra):
    rc, out, err = launch(capsys, "slurm", *NANO_2X8, *extra, "--dry-run")
    assert rc == 0, err
    path = GOLDEN / name
    if os.environ.get("HYMOE_REGEN_GOLDEN"):
        path.write_text(out)
        pytest.skip(f"regenerated {path.name}")
    assert out == path.read_text()
    assert subprocess.run(["bash", "-n"], input=out, text=True, check=False).returncode == 0  # valid bash


def test_sbatch_script_contents():
    """What the goldens must keep, said once in words."""
    plain = (GOLDEN / "sbatch_2x8.sh").read_text()
    boxed = (GOLDEN / "sbatch_2x8_container.sh").read_text()
    for script in (plain, boxed):
        for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                     "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@120",
                     "#SBATCH --output=/lustre/runs/nano/slurm-%j.out", "RANK=$SLURM_PROCID",
                     "LOCAL_RANK=$SLURM_LOCALID", "WORLD_SIZE=$SLURM_NTASKS", "scontrol requeue",
                     'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1', "run.dir=/lustre/runs/nano",
                     "export NCCL_IB_HCA=mlx5", "#SBATCH --exclusive"):
            assert line in script, line
    assert "--container-image" not in plain and "/lustre/hymoe/.venv/bin/python -m hymoe train" in plain
    assert "--container-image=/lustre/images/hymoe+25.11.sqsh" in boxed
    assert "--container-workdir=/lustre/hymoe" in boxed and "cmd=(python -m hymoe train" in boxed


def test_cpu_only_script_has_no_gpu_request(capsys, tmp_path):
    rc, out, err = launch(capsys, "slurm", "tiny", "--gpus-per-node", "0", "--ntasks-per-node", "2",
                          f"run.dir={tmp_path}/r", "--dry-run")
    assert rc == 0, err
    assert "#SBATCH --gpus" not in out and "#SBATCH --ntasks-per-node=2" in out
    assert "2 CPU processes = 2 ranks" in out


def test_sweep_writes_one_job_per_point(capsys, tmp_path):
    rc, out, err = launch(capsys, "slurm", "tiny", "-m", "optim.lr=1e-3,3e-3", "precision=bf16,fp32",
                          "--gpus-per-node", "1", f"run.dir={tmp_path}/sweep", "--dry-run")
    assert rc == 0, err
    scripts = out.split("# ---- job ")[1:]
    assert len(scripts) == 4
    assert scripts[0].startswith("0: optim.lr=0.001 precision=bf16")
    for i, script in enumerate(scripts):
        assert f"run.dir={tmp_path}/sweep/{i}" in script and f"#SBATCH --job-name=hymoe-tiny-{i}" in script
    assert scripts[3].startswith("3: optim.lr=0.003 precision=fp32")


# -- diagnostics -------------------------------------------------------------------------------
def test_diagnostics_report():
    from hymoe.launch.diagnostics import report
    from hymoe.train.recipe import load_recipe

    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "node0", "MASTER_PORT": "20001",
           "NCCL_IB_HCA": "mlx5", "SLURM_JOB_ID": "42", "SLURM_NTASKS": "2", "HOME": "/root"}
    text = report(load_recipe("tiny", ["precision=nvfp4"]), env)
    assert "world 2 = dp 2 × tp 1 × pp 1 × cp 1" in text
    assert "NCCL_IB_HCA=mlx5" in text and "MASTER_ADDR=node0" in text and "SLURM_JOB_ID=42" in text
    assert "HOME" not in text
    assert "torch " in text and "megatron-core 0.16.1" in text
    assert "nvfp4 → emulated" in text and ("cpu (" in text or "sm_" in text)
    bad = report(load_recipe("tiny", ["parallel=tp2"]), {"WORLD_SIZE": "3"})
    assert "✗ world size 3" in bad and "not divisible" in bad


# -- torchrun ----------------------------------------------------------------------------------
def test_torchrun_dry_run_multi_node(capsys):
    rc, out, err = launch(capsys, "torchrun", "tiny", "parallel=tp2", "--nproc-per-node", "2",
                          "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "node0:29500",
                          "run.dir=/shared/run", "--dry-run")
    assert rc == 0, err
    for part in ("-m torch.distributed.run", "--nproc-per-node=2", "--nnodes=2", "--node-rank=1",
                 "--master-addr=node0", "--master-port=29500", "-m hymoe train tiny parallel=tp2",
                 "run.dir=/shared/run"):
        assert part in out, part


@pytest.mark.distributed
def test_torchrun_trains_tiny_on_two_cpu_processes(demo_data, tmp_path):
    run = tmp_path / "run"
    r = hymoe("launch", "torchrun", "tiny", "--nproc-per-node", "2", "train.steps=4", "optim.warmup_steps=1",
              "train.global_batch=4", "train.micro_batch=2", "train.seq_len=64", "logging.progress=false",
              "logging.wandb=disabled", f"run.dir={run}", f"data.path={demo_data}",
              "data.prepare_demo_if_missing=false", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "--nproc-per-node=2" in r.stdout and "start-up diagnostics" in r.stdout
    assert "world 2 = dp 2" in r.stdout
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"
