#!/usr/bin/env bash
# Stop the one-node cluster that start.sh started: cancel jobs, stop the daemons, keep the logs.
set -uo pipefail
SLURM_BASE=${SLURM_BASE:-/tmp/tokenunify-slurm}
command -v scancel >/dev/null 2>&1 && timeout 10 scancel --full --user="$(id -un)" 2>/dev/null
for daemon in slurmd slurmctld munged; do
    pkill -x "$daemon" 2>/dev/null
done
running() { pgrep -x slurmd || pgrep -x slurmctld || pgrep -x munged; }
for _ in $(seq 20); do
    running >/dev/null || exit 0
    sleep 0.5
done
for daemon in slurmd slurmctld munged; do
    pkill -9 -x "$daemon" 2>/dev/null
done
exit 0
