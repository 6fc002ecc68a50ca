#!/usr/bin/env bash
# Stop the processes named like PATTERN (pgrep -x) that are not among BEFORE (the pids that ran before): what an
# installation started, and nothing else on the machine.
#
#     before=$(pgrep -x 'prometheus|nginx' || true); apt-get install ...; bash scripts/stop_new_processes.sh 'prometheus|nginx' "$before"
set -uo pipefail
pattern=$1
before=" $(echo "${2:-}" | tr '\n' ' ') "
for pid in $(pgrep -x "$pattern" || true); do
    case "$before" in
        *" $pid "*) ;;  # ran before: not ours
        *) echo "stopping $(cat "/proc/$pid/comm" 2>/dev/null) (pid $pid), started by the installation"
           kill "$pid" 2>/dev/null || true ;;
    esac
done
