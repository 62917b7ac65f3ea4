#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for the launcher's tests (tests/test_launch_slurm.py)
# and CI (.ci/run). Idempotent: exits at once when the cluster already answers; otherwise writes
# /etc/slurm/slurm.conf, starts munged, slurmctld and slurmd, and waits for the node to be idle.
#
#   bash tests/slurm/start_cluster.sh            # needs root and the Debian packages below
#   bash tests/slurm/start_cluster.sh --install  # apt-get install them first (CI does this)
#
# Settings are those that work without systemd or cgroups (containers, CI machines):
# process tracking by /proc, no task plugin, no accounting. State, spool, logs and pid files live
# under $HYMOE_SLURM_DIR (default /tmp/hymoe-slurm). Exit 1 with one line when it cannot start.
set -euo pipefail

DIR=${HYMOE_SLURM_DIR:-/tmp/hymoe-slurm}
CONF=/etc/slurm/slurm.conf

say() { echo "slurm: $*"; }
die() { echo "slurm: cannot start: $*" >&2; [[ -f $DIR/log/slurmctld.log ]] && tail -5 "$DIR/log/slurmctld.log" >&2; [[ -f $DIR/log/slurmd.log ]] && tail -5 "$DIR/log/slurmd.log" >&2; exit 1; }

node_state() { timeout 5 sinfo -h -o %T 2>/dev/null | head -1; }
ready() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }

if [[ ${1:-} == --install ]] && ! command -v slurmctld >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null \
        || die "apt-get install slurmctld slurmd slurm-client munge failed"
fi
for cmd in munged slurmctld slurmd sbatch sinfo; do
    command -v $cmd >/dev/null || die "$cmd not found (apt-get install slurmctld slurmd slurm-client munge)"
done
[[ $(id -u) == 0 ]] || die "needs root (the daemons run as root here)"

# munge: the key comes with the package; munged must run as the munge user.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [[ -f /etc/munge/munge.key ]] || { mungekey --create >/dev/null && chown munge:munge /etc/munge/munge.key; }
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged || die "munged did not start"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null 2>&1 || die "munge does not answer"
fi

host=$(hostname -s)
node=$(slurmd -C | head -1)  # NodeName=<host> CPUs=… RealMemory=…: this machine as slurmd sees it
wanted=$(cat <<EOF
# Written by hymoe's tests/slurm/start_cluster.sh: a one-node cluster on localhost.
ClusterName=hymoe
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120 s); short here
# so that the requeue test takes seconds.
AuthInfo=cred_expire=5
# ...and is started by the next periodic scheduler pass once that time has passed: run it every second.
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# Finished jobs stay visible to scontrol for 5 minutes (tests read their state).
MinJobAge=300
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)

if ready && [[ -f $CONF && $(cat "$CONF") == "$wanted" ]]; then say "already up ($(node_state))"; exit 0; fi

# Daemons of an earlier start (another config, or no longer answering): end them by their pid files.
for d in slurmd slurmctld; do
    pid=$(cat "$DIR/run/$d.pid" 2>/dev/null) || continue
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
done
mkdir -p "$DIR"/{state,spool,log,run} "$(dirname "$CONF")"
echo "$wanted" > "$CONF"

# -c: forget the jobs of an earlier cluster (their processes are gone).
slurmctld -c || die "slurmctld did not start"
slurmd || die "slurmd did not start"
for _ in $(seq 100); do ready && break; sleep 0.2; done
ready || die "node state is '$(node_state)', not idle after 20 s"
say "up: $(sinfo -h -o '%N %T %c CPUs')"
