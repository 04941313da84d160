#!/usr/bin/env bash
# Stop every process started by start_broker.sh and start_sites.sh.
set -uo pipefail
source "$(dirname "$0")/_common.sh"
shopt -s nullglob
pids=()
for pidfile in "$RUN_DIR"/*.pid; do
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" && pids+=("$pid") && echo "stopping $(basename "$pidfile" .pid) (pid $pid)"
  fi
  rm -f "$pidfile"
done
deadline=$((SECONDS + 10))
for pid in "${pids[@]}"; do
  while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.2; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
done
rm -f "$RUN_DIR/broker.address"
echo "all stopped"
