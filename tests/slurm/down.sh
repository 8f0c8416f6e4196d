#!/usr/bin/env bash
# Stop what up.sh DIR started: cancel the cluster's jobs, stop slurmd and
# slurmctld together (SIGTERM, then SIGKILL after a bounded wait of 10 s),
# munged if up.sh started it. Leaves DIR (logs) in place. Safe to run twice.
set -uo pipefail
dir=${1:-/tmp/cloudinfra-slurm}
[ -e "$dir/slurm.conf" ] && SLURM_CONF=$dir/slurm.conf timeout 10 scancel --full -u root >/dev/null 2>&1
pids=() names=()
signal() { # pidfile name: SIGTERM it if it is still that daemon
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 0
    rm -f "$1"
    [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$2" ] || return 0
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid") && names+=("$2")
}
signal "$dir/slurmd.pid" slurmd
signal "$dir/slurmctld.pid" slurmctld
if [ -e "$dir/munged.ours" ]; then
    signal /run/munge/munged.pid munged
    rm -f "$dir/munged.ours"
fi
for _ in $(seq 100); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
done
for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
if [ ${#names[@]} -gt 0 ]; then echo "slurm down: stopped ${names[*]}"; else echo "slurm down: stopped nothing"; fi
