#!/usr/bin/env bash
# Stop what up.sh DIR started: cancel the cluster's jobs, stop slurmd and
# slurmctld (SIGTERM, then SIGKILL after a bounded wait), munged if up.sh
# started it. Leaves DIR (logs) in place. Safe to run twice.
set -uo pipefail
dir=${1:-/tmp/cloudinfra-slurm}
[ -e "$dir/slurm.conf" ] && SLURM_CONF=$dir/slurm.conf scancel --full -u root >/dev/null 2>&1
stop() { # pidfile name
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 0
    [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$2" ] || { rm -f "$1"; return 0; }
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    rm -f "$1"
    stopped+=" $2"
}
stopped=
stop "$dir/slurmd.pid" slurmd
stop "$dir/slurmctld.pid" slurmctld
if [ -e "$dir/munged.ours" ]; then
    stop /run/munge/munged.pid munged
    rm -f "$dir/munged.ours"
fi
echo "slurm down: stopped${stopped:- nothing}"
