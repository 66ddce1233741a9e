#!/usr/bin/env bash
# /healthz while a /metrics render runs, through the real binary: a config of 10,000
# tenants (about 9 MB of exposition); ROUNDS times, a scrape with curl, then 5 ms later
# a health check on another connection. Prints each one's time_total, sorted.
#
#   cargo build --release && benches/load/scrape_health.sh [BINARY]
#
# Admin listener on 127.0.0.1:39901, data plane on 39080.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/release/bulkhead}
ROUNDS=${ROUNDS:-20}
command -v curl >/dev/null || { echo "missing curl" >&2; exit 1; }
[ -x "$BIN" ] || { echo "no $BIN: run cargo build --release" >&2; exit 1; }
TMP=$(mktemp -d)
BH=""
cleanup() {
  [ -n "$BH" ] && kill "$BH" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
{
  printf '[server]\nlisten = "127.0.0.1:39080"\nadmin_listen = "127.0.0.1:39901"\n'
  printf '[defaults.limits]\nrequests_per_second = 10\nburst = 10\nmax_body = "1MiB"\nmax_in_flight = 5\n'
  printf '[upstreams.u]\ntargets = ["127.0.0.1:9"]\n'
  x=$(printf 'x%.0s' $(seq 50))
  for i in $(seq -f '%05g' 0 9999); do
    printf '[tenants.tenant-%s-%s]\nhosts = ["tenant-%s-%s.com"]\nupstream = "u"\n' "$i" "$x" "$i" "$x"
  done
} > "$TMP/gateway.toml"
"$BIN" run --config "$TMP/gateway.toml" 2>/dev/null &
BH=$!
for _ in $(seq 100); do curl -sf -o /dev/null localhost:39901/healthz && break; sleep 0.1; done
curl -sf -o /dev/null localhost:39901/metrics
for i in $(seq "$ROUNDS"); do
  curl -s -o /dev/null -w 'metrics %{time_total}\n' localhost:39901/metrics > "$TMP/m.$i" &
  m=$!
  sleep 0.005
  curl -s -o /dev/null -w 'healthz %{time_total}\n' localhost:39901/healthz >> "$TMP/h"
  wait "$m"
done
for kind in healthz metrics; do
  printf '%s (s):' "$kind"
  cat "$TMP"/h "$TMP"/m.* | awk -v k="$kind" '$1 == k { print $2 }' | sort -n | tr '\n' ' '
  echo
done
