"""``hymoe launch {torchrun,slurm} RECIPE [overrides]``: the flags, their checks and what is printed.

Every bad input stops before anything starts, with one line that names the flag (or the recipe
field) to change; the recipe is composed and checked against the number of ranks it will get.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

LAUNCH_HELP = """usage: hymoe launch {torchrun,slurm} RECIPE [KEY=VALUE ...] [flags]

Start `hymoe train RECIPE [KEY=VALUE ...]` on several processes:
  torchrun   on this node (or on each node of a multi-node run), one process per GPU
  slurm      write an sbatch script (one task per GPU, preemption → checkpoint → requeue) and submit it

Both check the recipe against the number of ranks first, pin run.dir to one absolute folder (the
default holds the time, which every rank and every requeue would resolve differently), and take
-m/--multirun sweeps: one run (torchrun: one after another) or one Slurm job per point.
`hymoe launch torchrun --help`, `hymoe launch slurm --help` explain each flag; docs/launch.md has
walk-throughs (containers, multi-node, requeue, sweeps)."""

TORCHRUN_EPILOG = """examples:
  hymoe launch torchrun tiny --nproc-per-node 2 parallel=tp2        # 2 CPU processes over gloo
  hymoe launch torchrun tiny_gpu --nproc-per-node 8 train.micro_batch=2 precision=nvfp4
  # two nodes: the same line on each, with its --node-rank
  hymoe launch torchrun nano_30b_a3b --nproc-per-node 8 --nnodes 2 --node-rank 0 \\
      --rdzv-endpoint node0:29500 run.dir=/lustre/runs/nano parallel.tp=4 parallel.ep=4"""

SLURM_EPILOG = """examples:
  hymoe launch slurm tiny_gpu --nodes 1 --gpus-per-node 8 --partition batch --time 04:00:00 train.micro_batch=2
  hymoe launch slurm nano_30b_a3b --nodes 2 --gpus-per-node 8 --account llm \\
      --container-image /lustre/images/hymoe.sqsh --container-mounts /lustre:/lustre \\
      run.dir=/lustre/runs/nano parallel.tp=4 parallel.ep=4 data.path=/lustre/data/mine
  hymoe launch slurm tiny --gpus-per-node 0 --ntasks-per-node 2      # CPU-only nodes
  hymoe launch slurm tiny -m precision=bf16,nvfp4 --gpus-per-node 1  # one job per point
  hymoe launch slurm tiny_gpu --gpus-per-node 1 --dry-run            # print the script only

The script is written to <run.dir>/launch.sbatch and the log to <run.dir>/slurm-<jobid>.out
(appended to across requeues). `sbatch <run.dir>/launch.sbatch` continues a stopped run."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line that names the flag, not argparse's usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be ≥ {minimum}, got {value}")
        return value
    return parse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", metavar="RECIPE", help="a recipe name from recipes/ (tiny, tiny_gpu, nano_30b_a3b, ...)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="Hydra overrides for the recipe, as for `hymoe train` (train.steps=100 precision=nvfp4 ...)")
    p.add_argument("-m", "--multirun", action="store_true",
                   help="sweep comma-separated overrides (optim.lr=1e-3,3e-3): one run per point of the "
                        "cartesian product, each in <sweep dir>/<i> (default sweep dir multirun/RECIPE/<time>; "
                        "run.dir=DIR sets it)")
    p.add_argument("--dry-run", action="store_true", help="print what would be started, start nothing")


def torchrun_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hymoe launch torchrun", formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Run `hymoe train RECIPE ...` under torchrun (python -m torch.distributed.run): "
                            "one process per GPU; on a machine without GPUs, CPU processes over gloo.",
                epilog=TORCHRUN_EPILOG)
    _common(p)
    p.add_argument("--nproc-per-node", type=_at_least(1), metavar="N",
                   help="processes on this node (default: the number of visible GPUs, or 1 without GPUs)")
    p.add_argument("--nnodes", type=_at_least(1), default=1, metavar="M",
                   help="nodes in the run (default 1); for M > 1 run the same command on every node")
    p.add_argument("--node-rank", type=_at_least(0), metavar="R",
                   help="this node's index 0..M-1 (needed when --nnodes > 1; node 0 hosts rank 0)")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="node 0's address and a free port, the same on every node (needed when --nnodes > 1; "
                        "default on one node: 127.0.0.1 and a free port)")
    return p


def slurm_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hymoe launch slurm", formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Write an sbatch script that runs `hymoe train RECIPE ...` with one task per GPU "
                            "(srun; rendezvous from Slurm's variables), checkpoints and requeues itself before "
                            "the time limit, and resumes on each start; then submit it with sbatch and print "
                            "the job id, log and run folder.",
                epilog=SLURM_EPILOG)
    _common(p)
    p.add_argument("--nodes", type=_at_least(1), default=1, metavar="N", help="nodes to run on, all with the same GPUs (default 1)")
    p.add_argument("--gpus-per-node", type=_at_least(0), default=8, metavar="G",
                   help="GPUs per node, one task each (default 8); 0 for CPU-only nodes (no GPU request)")
    p.add_argument("--ntasks-per-node", type=_at_least(1), metavar="K",
                   help="processes per node (default: G, or 1 with --gpus-per-node 0); must equal G on GPUs")
    p.add_argument("--cpus-per-task", type=_at_least(1), metavar="C",
                   help="CPU cores per task, for data-loader workers (default: the cluster's)")
    p.add_argument("--partition", metavar="P", help="Slurm partition (default: the cluster's default)")
    p.add_argument("--account", metavar="A", help="Slurm account to charge")
    p.add_argument("--time", metavar="T", help="time limit, in Slurm's forms (04:00:00, 2-00:00:00); the "
                   "job checkpoints and requeues itself --signal-seconds before it")
    p.add_argument("--job-name", metavar="NAME", help="Slurm job name (default hymoe-RECIPE)")
    p.add_argument("--signal-seconds", type=_at_least(1), default=120, metavar="S",
                   help="seconds before the time limit at which the job checkpoints and requeues (default 120; "
                        "allow for one step plus one checkpoint save)")
    p.add_argument("--container-image", metavar="IMG",
                   help="run each task in this image with pyxis/enroot (srun --container-image): a registry "
                        "name such as nvcr.io#org/hymoe:tag or a .sqsh file")
    p.add_argument("--container-mounts", metavar="SRC:DST[,...]",
                   help="pyxis bind mounts; mount run.dir and data at the same path they have outside")
    p.add_argument("--container-workdir", metavar="DIR",
                   help="working folder inside the container (default: --chdir)")
    p.add_argument("--python", metavar="PATH",
                   help="the Python that runs hymoe in each task (default: this one, "
                        f"{sys.executable}; with --container-image: the image's `python`)")
    p.add_argument("--chdir", metavar="DIR",
                   help="the job's working folder; relative run.dir and data.path start here (default: the current folder)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="export this in the job (repeatable), e.g. NCCL_IB_HCA=mlx5 NCCL_SOCKET_IFNAME=ib0")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="one more #SBATCH line, verbatim (repeatable), e.g. --sbatch-arg=--qos=high "
                        "--sbatch-arg=--exclusive")
    return p


def _fail(prog: str, msg: str, code: int = 2) -> int:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return code


def _recipe_or_fail(p: argparse.ArgumentParser, args) -> None:
    if args.recipe is None:
        from hymoe.train.recipe import list_recipes

        p.error(f"RECIPE is required (one of: {', '.join(list_recipes())})")
    if "=" in args.recipe or args.recipe.startswith(("+", "~")):
        p.error(f"RECIPE comes first, before the overrides; got {args.recipe!r}")


def cmd_torchrun(argv: list[str]) -> int:
    from hymoe.launch import torchrun
    from hymoe.launch.job import prepare_all
    from hymoe.train.config import ConfigError

    p = torchrun_parser()
    args = p.parse_intermixed_args(argv)
    _recipe_or_fail(p, args)
    if args.nnodes > 1:
        if args.node_rank is None:
            p.error(f"--node-rank is required with --nnodes {args.nnodes} (0 on the node at --rdzv-endpoint)")
        if args.rdzv_endpoint is None:
            p.error(f"--rdzv-endpoint HOST:PORT is required with --nnodes {args.nnodes} (node 0's address)")
        if not any(o.startswith("run.dir=") for o in args.overrides):
            p.error("run.dir=DIR is required with --nnodes > 1: every node must write to the same folder")
    if args.node_rank is not None and args.node_rank >= args.nnodes:
        p.error(f"--node-rank: {args.node_rank} is not below --nnodes {args.nnodes}")
    if args.rdzv_endpoint is not None:
        host, _, port = args.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            p.error(f"--rdzv-endpoint: expected HOST:PORT, got {args.rdzv_endpoint!r}")
    nproc = args.nproc_per_node
    if nproc is None:
        import torch

        nproc = torch.cuda.device_count() or 1
    try:
        jobs = prepare_all(args.recipe, args.overrides, nproc * args.nnodes, Path.cwd(), args.multirun)
    except ConfigError as e:
        return _fail(p.prog, str(e))
    for job in jobs:
        cmd = torchrun.command(job, nproc, args.nnodes, args.node_rank or 0, args.rdzv_endpoint)
        print(f"hymoe launch: {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        rc, stopped = _run_forwarding_signals(cmd, torchrun.environment(), torchrun.signal_for_workers)
        if rc or stopped:
            return rc
    return 0


def _run_forwarding_signals(cmd: list[str], env: dict, translate) -> tuple[int, bool]:
    """Run ``cmd``; pass TERM and USR1 (a scheduler's stop or preemption warning) on to it, where
    torchrun forwards them to the workers, whose trainers save and stop. Returns (exit status,
    whether a signal came)."""
    proc = subprocess.Popen(cmd, env=env)
    got: list[int] = []

    def forward(signum, frame):
        got.append(signum)
        proc.send_signal(translate(signum))

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return proc.wait(), bool(got)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:  # KeyboardInterrupt: the workers got it from the terminal too
            proc.terminate()
            proc.wait()


def cmd_slurm(argv: list[str]) -> int:
    from hymoe.launch import slurm
    from hymoe.launch.job import prepare_all
    from hymoe.train.config import ConfigError

    p = slurm_parser()
    args = p.parse_intermixed_args(argv)
    _recipe_or_fail(p, args)
    gpus = args.gpus_per_node
    ntasks = args.ntasks_per_node or gpus or 1
    if gpus and ntasks != gpus:
        p.error(f"--ntasks-per-node: {ntasks} ≠ --gpus-per-node {gpus}; hymoe runs one process per GPU")
    if (args.container_mounts or args.container_workdir) and not args.container_image:
        p.error("--container-mounts/--container-workdir need --container-image")
    for kv in args.env:
        key, eq, _ = kv.partition("=")
        if not eq or not key.isidentifier():
            p.error(f"--env: expected KEY=VALUE, got {kv!r}")
    chdir = Path(args.chdir or os.getcwd()).absolute()
    opt = slurm.SlurmOptions(
        nodes=args.nodes, gpus_per_node=gpus, ntasks_per_node=ntasks, cpus_per_task=args.cpus_per_task,
        partition=args.partition, account=args.account, time=args.time, job_name=args.job_name,
        signal_seconds=args.signal_seconds, chdir=str(chdir),
        python=args.python or ("python" if args.container_image else sys.executable),
        container_image=args.container_image, container_mounts=args.container_mounts,
        container_workdir=args.container_workdir, env=args.env, sbatch_args=args.sbatch_arg,
        command="hymoe launch slurm " + shlex.join(a for a in argv if a != "--dry-run"),
    )
    try:
        jobs = prepare_all(args.recipe, args.overrides, opt.world_size, chdir, args.multirun)
    except ConfigError as e:
        return _fail(p.prog, str(e))
    if args.multirun and not args.dry_run:
        print(f"multirun: {len(jobs)} jobs")
    for i, job in enumerate(jobs):
        if len(jobs) > 1 and not args.job_name:
            opt.job_name = f"hymoe-{args.recipe}-{i}"
        if args.dry_run:
            if len(jobs) > 1:
                print(f"# ---- job {i}: {' '.join(job.point)} " + "-" * 40)
            print(slurm.render(job, opt))
            continue
        try:
            job_id, script = slurm.submit(job, opt)
        except slurm.SlurmError as e:
            return _fail(p.prog, str(e), 1)
        print(f"submitted job {job_id}" + (f" · {' '.join(job.point)}" if job.point else ""))
        print(f"  log     {slurm.log_path(job).replace('%j', job_id)}")
        print(f"  run     {job.run_dir}")
        print(f"  script  {script}")
    return 0


def cmd_launch(argv: list[str]) -> int:
    """torchrun / Slurm launchers (sbatch script with preemption → requeue)"""
    if not argv or argv[0] in ("-h", "--help"):
        print(LAUNCH_HELP)
        return 0 if argv else 2
    commands = {"torchrun": cmd_torchrun, "slurm": cmd_slurm}
    if argv[0] not in commands:
        return _fail("hymoe launch", f"unknown launcher {argv[0]!r}; one of torchrun, slurm")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # megatron-core's import-time warnings
    import warnings

    warnings.filterwarnings("ignore")
    return commands[argv[0]](argv[1:])
