#!/usr/bin/env bash
# A real one-host Slurm for tests/slurm.rs, in DIR (default
# /tmp/cloudinfra-slurm): munged (reused if already running), slurmctld and
# slurmd as daemons with pid files, this host as the only node of partition
# PARTITION (default cloudtest). Installs nothing: needs root and the Debian
# packages slurmctld slurmd slurm-client munge. No systemd. Free ports are
# picked at run time. Clients find the cluster with SLURM_CONF=DIR/slurm.conf.
# Prints one line saying what it did; on failure one line saying why (and
# the tail of the daemon's log), exit status 1. Stop it with down.sh DIR.
set -uo pipefail
dir=${1:-/tmp/cloudinfra-slurm}
partition=${2:-cloudtest}
limit=${SLURM_UP_TIMEOUT:-60}

fail() { echo "slurm up: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "needs root (it starts munged, slurmctld and slurmd)"
for tool in munged slurmctld slurmd sinfo sbatch squeue scontrol scancel ss runuser; do
    command -v "$tool" >/dev/null || fail "$tool not found: apt-get install slurmctld slurmd slurm-client munge"
done
start=$(date +%s%N)
[ -e "$dir/slurmctld.pid" ] && "$(dirname "$0")/down.sh" "$dir" >/dev/null 2>&1
mkdir -p "$dir/state" "$dir/spool" || fail "cannot create $dir"
dir=$(cd "$dir" && pwd)

# munge: Debian's package makes /etc/munge/munge.key; make one if missing.
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then mungekey --create --keyfile /etc/munge/munge.key || fail "mungekey failed"
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 2>/dev/null || fail "cannot write the munge key"; fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
if munge -n </dev/null >/dev/null 2>&1; then
    munge_note="munged already running"
else
    install -d -o munge -g munge -m 0755 /run/munge /var/lib/munge /var/log/munge
    runuser -u munge -- munged >"$dir/munged.out" 2>&1 || fail "munged did not start: $(tail -n 3 "$dir/munged.out" | tr '\n' ' ')"
    touch "$dir/munged.ours"
    munge_note="started munged"
fi

# Two free TCP ports (none fixed: other tests and users share the host),
# below the kernel's ephemeral range so no outgoing connection holds them.
low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
free_port() { # port to avoid
    local p
    for _ in $(seq 200); do
        p=$(( 10000 + $(od -An -N2 -tu2 /dev/urandom) % (low - 10000) ))
        [ "$p" != "${1:-}" ] || continue
        ss -Htan "sport = :$p" | grep -q . || { echo "$p"; return; }
    done
    echo "no free port found between 10000 and $low" >&2
    return 1
}
ctld_port=$(free_port) && slurmd_port=$(free_port "$ctld_port") || fail "no free port found below $low"
host=$(hostname -s 2>/dev/null || uname -n | cut -d. -f1)
cpus=$(nproc)
cat >"$dir/slurm.conf" <<CONF
# Written by tests/slurm/up.sh: a throwaway one-host cluster.
ClusterName=cloudinfra
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=300
KillWait=5
SlurmdTimeout=30
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=$partition Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF" -c >"$dir/slurmctld.out" 2>&1 \
    || fail "slurmctld did not start: $(tail -n 3 "$dir/slurmctld.out" "$dir/slurmctld.log" 2>/dev/null | tr '\n' ' ')"
slurmd -f "$SLURM_CONF" -N "$host" >"$dir/slurmd.out" 2>&1 \
    || fail "slurmd did not start: $(tail -n 3 "$dir/slurmd.out" "$dir/slurmd.log" 2>/dev/null | tr '\n' ' ')"

# Wait, bounded, until the node is idle in the partition.
deadline=$(( $(date +%s) + limit ))
state=
while [ "$(date +%s)" -lt "$deadline" ]; do
    state=$(sinfo -h -p "$partition" -o %t 2>/dev/null | head -n 1)
    [ "$state" = idle ] && break
    for d in slurmctld slurmd; do
        pid=$(cat "$dir/$d.pid" 2>/dev/null) && [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null && {
            "$(dirname "$0")/down.sh" "$dir" >/dev/null 2>&1
            fail "$d exited: $(grep -i -E 'error|fatal' "$dir/$d.log" 2>/dev/null | tail -n 3 | tr '\n' ' ')"
        }
    done
    sleep 0.2
done
if [ "$state" != idle ]; then
    why="node $host is '${state:-unknown}' after ${limit}s, not idle"
    "$(dirname "$0")/down.sh" "$dir" >/dev/null 2>&1
    fail "$why; slurmctld.log: $(tail -n 3 "$dir/slurmctld.log" 2>/dev/null | tr '\n' ' ') slurmd.log: $(tail -n 3 "$dir/slurmd.log" 2>/dev/null | tr '\n' ' ')"
fi
took_ms=$(( ($(date +%s%N) - start) / 1000000 ))
echo "slurm up: $munge_note; slurmctld :$ctld_port and slurmd :$slurmd_port up, node $host ($cpus CPUs) idle in partition $partition after ${took_ms} ms; SLURM_CONF=$SLURM_CONF"
