#!/usr/bin/env bash
# Alternating A/B runs of two Bulkhead binaries or configs on one proxy core, for
# measuring one change at a time (the full comparison with nginx and HAProxy is run.sh).
#
#   benches/load/ab.sh BIN_A CONF_A BIN_B CONF_B [ROUNDS]
#
# Backend: nginx `return 200` on CPU 0 (127.0.0.1:19000, which the configs must name);
# the proxy on CPU 1 (127.0.0.1:18080); wrk -t1 -c64 on CPU 0, 1 s warm-up, 8 s measured
# (PROTO=h2: h2load -c64 -m10 over h2c instead). ENV_A / ENV_B: environment assignments
# for each side, e.g. ENV_A=BULKHEAD_H2=hyper to compare hyper's HTTP/2 server with the
# gateway's own in one binary.
# Prints one line per run: "A|B req/s", then the proxy's CPU time per request (user and
# system µs, from /proc/PID/stat) — the steadier measure when the machine's speed
# changes between runs; compare within a round — and, for HTTP/1.1, wrk's p50 and p99.
set -euo pipefail
[ $# -ge 4 ] || { sed -n 2,9p "$0"; exit 2; }
BIN_A=$1 CONF_A=$2 BIN_B=$3 CONF_B=$4 ROUNDS=${5:-3}
PROTO=${PROTO:-h1}
LOADGEN=wrk
[ "$PROTO" = h2 ] && LOADGEN=h2load
for t in nginx "$LOADGEN" taskset; do
  command -v "$t" >/dev/null || { echo "missing $t: apt-get install -y nginx wrk nghttp2-client util-linux" >&2; exit 1; }
done
TMP=$(mktemp -d); chmod 755 "$TMP"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
# shellcheck source=benches/load/backend.sh
. "$(dirname "$0")/backend.sh"
start_backend
load() { # seconds
  if [ "$PROTO" = h2 ]; then
    taskset -c 0 h2load -t1 -c64 -m10 -D "$1" -H ':authority: t1.example.com' http://127.0.0.1:18080/ |
      awk '/^requests:/ {print $8}'
  else
    taskset -c 0 wrk -t1 -c64 -d"$1"s --latency -H 'Host: t1.example.com' http://127.0.0.1:18080/ |
      awk '/^ +50%/ {p50 = $2} /^ +99%/ {p99 = $2} /requests in/ {n = $1} END {print n, "p50 " p50 " p99 " p99}'
  fi
}
run() { # label bin conf env
  # shellcheck disable=SC2086 # $4: zero or more VAR=value words
  env $4 RUST_LOG=warn taskset -c 1 "$2" run --no-watch --config "$3" & local pid=$!
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/18080) 2>/dev/null && break; sleep 0.1; done
  load 1 >/dev/null
  local n lat u0 s0 u1 s1
  read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
  read -r n lat < <(load 8)
  read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
  awk -v l="$1" -v n="$n" -v lat="${lat:-}" -v t="$(getconf CLK_TCK)" -v du=$((u1 - u0)) -v ds=$((s1 - s0)) \
    'BEGIN { printf "%s %.0f req/s  user %.2f us  sys %.2f us  per request  %s\n", l, n / 8, du / t * 1e6 / n, ds / t * 1e6 / n, lat }' </dev/null
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
for i in $(seq "$ROUNDS"); do
  run "A" "$BIN_A" "$CONF_A" "${ENV_A:-}"
  run "B" "$BIN_B" "$CONF_B" "${ENV_B:-}"
done
