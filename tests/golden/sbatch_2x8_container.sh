#!/bin/bash
# hymoe: nano_30b_a3b on 2 nodes × 8 GPUs = 16 ranks.
# Written by: hymoe launch slurm nano_30b_a3b --nodes 2 --gpus-per-node 8 --partition batch --account llm --time 04:00:00 --cpus-per-task 16 --chdir /lustre/hymoe --env NCCL_IB_HCA=mlx5 --sbatch-arg=--exclusive run.dir=/lustre/runs/nano parallel.tp=4 parallel.ep=4 data.path=/lustre/data/pretraining --container-image /lustre/images/hymoe+25.11.sqsh --container-mounts /lustre:/lustre
# `sbatch` this file again to continue the run: it resumes from its newest checkpoint.
#SBATCH --job-name=hymoe-nano_30b_a3b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --partition=batch
#SBATCH --account=llm
#SBATCH --time=04:00:00
#SBATCH --chdir=/lustre/hymoe
#SBATCH --output=/lustre/runs/nano/slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --exclusive

set -uo pipefail

# Rendezvous: rank 0 runs on the allocation's first node; the port follows the job id so that
# jobs sharing a node do not collide.
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export NCCL_IB_HCA=mlx5

# What every task runs (torchrun's variables are set per task from Slurm's, in srun below).
cmd=(python -m hymoe train nano_30b_a3b parallel.tp=4 parallel.ep=4 data.path=/lustre/data/pretraining run.dir=/lustre/runs/nano)

echo "hymoe: job $SLURM_JOB_ID start $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT"

# USR1 (sent --signal seconds before the time limit): have every task checkpoint and exit,
# then requeue. TERM (scancel, scontrol requeue, preemption): Slurm signals every process of
# the job itself and decides about the requeue; wait for the tasks to finish saving.
preempted=0 srun_pid=""
trap 'preempted=1; echo "hymoe: USR1: checkpointing, then requeueing"; kill -USR1 "$srun_pid" 2>/dev/null' USR1
trap 'echo "hymoe: TERM: the tasks save a checkpoint and stop"' TERM

srun --kill-on-bad-exit=1 \
    --cpus-per-task=16 \
    --container-image=/lustre/images/hymoe+25.11.sqsh \
    --container-mounts=/lustre:/lustre \
    --container-workdir=/lustre/hymoe \
    bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' hymoe-task "${cmd[@]}" &
srun_pid=$!
# A trapped signal interrupts `wait`; wait until srun has really ended, then take its status.
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done
wait "$srun_pid"; rc=$?

# Requeue after a USR1 even if a task failed while stopping: the next start resumes from the
# newest complete checkpoint, which is at worst the last periodic one.
if (( preempted )); then
    echo "hymoe: requeueing job $SLURM_JOB_ID (tasks exited with $rc)"
    scontrol requeue "$SLURM_JOB_ID" || {
        echo "hymoe: requeue failed; sbatch /lustre/runs/nano/launch.sbatch continues the run" >&2; exit 1; }
fi
exit $rc

