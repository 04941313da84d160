#!/usr/bin/env bash
# Start site-1..site-N as background `fedstream node` processes: scripts/start_sites.sh N [BROKER_URL]
# The broker defaults to $FEDSTREAM_BROKER, else the one started by start_broker.sh.
# Each site receives files into $FEDSTREAM_RUN_DIR/site-I; logs and pid files go there too.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
COUNT="${1:?usage: start_sites.sh N [BROKER_URL]}"
BROKER="${2:-${FEDSTREAM_BROKER:-$(cat "$RUN_DIR/broker.address" 2>/dev/null || true)}}"
if [[ -z "$BROKER" ]]; then
  echo "no broker address: pass one, set FEDSTREAM_BROKER, or run scripts/start_broker.sh" >&2
  exit 1
fi
for ((i = 1; i <= COUNT; i++)); do
  name="site-$i"
  mkdir -p "$RUN_DIR/$name"
  nohup "${FEDSTREAM[@]}" node "$name" --broker "$BROKER" --recv-dir "$RUN_DIR/$name" \
    >"$RUN_DIR/$name.log" 2>&1 &
  echo $! > "$RUN_DIR/$name.pid"
done
for ((i = 1; i <= COUNT; i++)); do
  if ! wait_for_line "$RUN_DIR/site-$i.log" '^ready' 15; then
    echo "site-$i did not start; see $RUN_DIR/site-$i.log" >&2
    exit 1
  fi
  echo "site-$i ready (pid $(cat "$RUN_DIR/site-$i.pid")), receiving into $RUN_DIR/site-$i"
done
