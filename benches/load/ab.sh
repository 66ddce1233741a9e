#!/usr/bin/env bash
# Alternating A/B runs of two Bulkhead binaries or configs on one proxy core, for
# measuring one change at a time (the full comparison with nginx and HAProxy is run.sh).
#
#   benches/load/ab.sh BIN_A CONF_A BIN_B CONF_B [ROUNDS]
#
# Backend: nginx `return 200` on CPU 0 (127.0.0.1:19000, which the configs must name);
# the proxy on CPU 1 (127.0.0.1:18080); wrk -t1 -c64 on CPU 0, 1 s warm-up, 8 s measured.
# Prints one "A|B req/s" line per run; compare within a round.
set -euo pipefail
[ $# -ge 4 ] || { sed -n 2,9p "$0"; exit 2; }
BIN_A=$1 CONF_A=$2 BIN_B=$3 CONF_B=$4 ROUNDS=${5:-3}
for t in nginx wrk taskset; do
  command -v "$t" >/dev/null || { echo "missing $t: apt-get install -y nginx wrk util-linux" >&2; exit 1; }
done
TMP=$(mktemp -d); chmod 755 "$TMP"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
# shellcheck source=benches/load/backend.sh
. "$(dirname "$0")/backend.sh"
start_backend
run() { # label bin conf
  RUST_LOG=warn taskset -c 1 "$2" run --no-watch --config "$3" & local pid=$!
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/18080) 2>/dev/null && break; sleep 0.1; done
  taskset -c 0 wrk -t1 -c64 -d1s -H 'Host: t1.example.com' http://127.0.0.1:18080/ >/dev/null
  local r
  r=$(taskset -c 0 wrk -t1 -c64 -d8s -H 'Host: t1.example.com' http://127.0.0.1:18080/ | awk '/Requests\/sec/ {print $2}')
  echo "$1 $r"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
for i in $(seq "$ROUNDS"); do
  run "A" "$BIN_A" "$CONF_A"
  run "B" "$BIN_B" "$CONF_B"
done
