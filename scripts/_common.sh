# Shared by the start/stop scripts: where runs live and how fedstream is invoked.
RUN_DIR="${FEDSTREAM_RUN_DIR:-$PWD/fedstream-run}"
if command -v fedstream >/dev/null 2>&1; then
  FEDSTREAM=(fedstream)
else
  FEDSTREAM=(python3 -m fedstream.nodes)  # needs fedstream installed: pip install .
fi
mkdir -p "$RUN_DIR"

# wait_for_line FILE PATTERN SECONDS: wait until FILE has a line matching PATTERN.
wait_for_line() {
  local file=$1 pattern=$2 deadline=$((SECONDS + $3))
  until grep -q -- "$pattern" "$file" 2>/dev/null; do
    if (( SECONDS >= deadline )); then return 1; fi
    sleep 0.2
  done
}
