#!/usr/bin/env bash
# Start a fedstream broker in the background: scripts/start_broker.sh [tcp://127.0.0.1:5550]
# Log and pid file go to $FEDSTREAM_RUN_DIR (default ./fedstream-run).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
BIND="${1:-tcp://127.0.0.1:5550}"
if [[ -f "$RUN_DIR/broker.pid" ]] && kill -0 "$(cat "$RUN_DIR/broker.pid")" 2>/dev/null; then
  echo "a broker is already running (pid $(cat "$RUN_DIR/broker.pid")); run scripts/stop_all.sh first" >&2
  exit 1
fi
: > "$RUN_DIR/broker.log"
nohup "${FEDSTREAM[@]}" broker --bind "$BIND" >"$RUN_DIR/broker.log" 2>&1 &
echo $! > "$RUN_DIR/broker.pid"
if ! wait_for_line "$RUN_DIR/broker.log" '^tcp://' 15; then
  echo "the broker did not start; see $RUN_DIR/broker.log" >&2
  exit 1
fi
ADDRESS=$(grep -m1 '^tcp://' "$RUN_DIR/broker.log")
echo "$ADDRESS" > "$RUN_DIR/broker.address"
echo "broker at $ADDRESS (pid $(cat "$RUN_DIR/broker.pid")); export FEDSTREAM_BROKER=$ADDRESS"
