#!/usr/bin/env bash
# Reload cost through the real binary (issue 4):
#  1. time of `POST /reload` (read, parse, validate, build, diff, swap) for 10, 1,000 and
#     10,000 tenants, alternating between two files that differ in one tenant's upstream;
#  2. proxy throughput with 10,000 tenants while reloading once a second vs not (wrk,
#     HTTP/1.1, 64 connections, load spread over 1,000 tenants), alternating runs.
#
#   cargo build --release && benches/load/reload.sh
#
# Backend nginx and wrk on CPU 0, Bulkhead (one worker) on CPU 1, 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BULKHEAD_BIN:-target/release/bulkhead}
ROUNDS=${ROUNDS:-9}
DURATION=${DURATION:-10s}
for t in nginx wrk taskset curl python3; do
  command -v "$t" >/dev/null || { echo "missing $t: apt-get install -y nginx wrk curl" >&2; exit 1; }
done
[ -x "$BIN" ] || { echo "no $BIN: run cargo build --release" >&2; exit 1; }
TMP=$(mktemp -d); chmod 755 "$TMP"
PIDS=()
BH=""
cleanup() {
  for p in "${PIDS[@]}" $BH; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
# shellcheck source=benches/load/backend.sh
. benches/load/backend.sh
start_backend

gen() { # n upstream-of-t0 file
  python3 - "$1" "$2" "$3" <<'PY'
import sys
n, up, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
s = ['[server]\nlisten = "127.0.0.1:28080"\nadmin_listen = "127.0.0.1:28081"\nworkers = 1\naccess_log = false\n'
     '[upstreams.blue]\ntargets = ["127.0.0.1:19000"]\n[upstreams.green]\ntargets = ["127.0.0.1:19000"]\n'
     '[defaults]\nupstream = "blue"\n[defaults.limits]\nrequests_per_second = 10000000\nburst = 10000000\nmax_in_flight = 100000\nmax_body = "1MiB"\n']
for i in range(n):
    u = up if i == 0 else "blue"
    s.append(f'[tenants.t{i}]\nhosts = ["t{i}.example.com", "*.t{i}.example.com"]\nupstream = "{u}"\nfeatures = ["f{i % 7}"]\n')
open(out, "w").write("".join(s))
PY
}
start() { # config
  RUST_LOG=warn taskset -c 1 "$BIN" run --no-watch --config "$1" & BH=$!
  for _ in $(seq 100); do curl -sf -o /dev/null 127.0.0.1:28081/readyz && return; sleep 0.1; done
  echo "bulkhead did not start" >&2; exit 1
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "tenants  POST /reload ms (median of $ROUNDS)  min  max"
for n in 10 1000 10000; do
  gen "$n" blue "$TMP/a.toml"; gen "$n" green "$TMP/b.toml"
  cp "$TMP/a.toml" "$TMP/live.toml"
  start "$TMP/live.toml"
  : >"$TMP/times"
  for i in $(seq "$ROUNDS"); do
    if [ $((i % 2)) = 1 ]; then cp "$TMP/b.toml" "$TMP/live.toml"; else cp "$TMP/a.toml" "$TMP/live.toml"; fi
    t=$(curl -sf -o /dev/null -w '%{time_total}' -X POST 127.0.0.1:28081/reload)
    awk -v t="$t" 'BEGIN { printf "%.1f\n", t * 1000 }' >>"$TMP/times"
  done
  printf "%7s  %8s  %8s  %8s\n" "$n" "$(median <"$TMP/times")" "$(sort -n "$TMP/times" | head -1)" "$(sort -n "$TMP/times" | tail -1)"
  kill "$BH"; wait "$BH" 2>/dev/null || true; BH=""
done

cat >"$TMP/rotate.lua" <<'LUA'
local reqs, i = {}, 0
init = function() for t = 0, 999 do reqs[t] = wrk.format("GET", "/", { Host = "t" .. t .. ".example.com" }) end end
request = function() i = (i + 1) % 1000; return reqs[i] end
LUA
cp "$TMP/a.toml" "$TMP/live.toml"   # 10,000 tenants
start "$TMP/live.toml"
echo
echo "10,000 tenants, wrk -t1 -c64 -d$DURATION over 1,000 of them: req/s"
for round in 1 2 3; do
  for mode in steady reloading; do
    RL=""
    if [ "$mode" = reloading ]; then
      # One reload a second, alternating between the two files.
      ( while :; do cp "$TMP/b.toml" "$TMP/live.toml"; curl -sf -o /dev/null -X POST 127.0.0.1:28081/reload; sleep 1
                    cp "$TMP/a.toml" "$TMP/live.toml"; curl -sf -o /dev/null -X POST 127.0.0.1:28081/reload; sleep 1; done ) & RL=$!
    fi
    r=$(taskset -c 0 wrk -t1 -c64 -d"$DURATION" -s "$TMP/rotate.lua" http://127.0.0.1:28080/ | awk '/Requests\/sec/ {print $2}')
    [ -n "$RL" ] && { kill "$RL"; wait "$RL" 2>/dev/null || true; }
    echo "round $round  $mode  $r"
  done
done
