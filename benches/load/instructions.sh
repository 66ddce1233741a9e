#!/usr/bin/env bash
# User-space instructions per request of one Bulkhead binary, counted by callgrind:
# a measure of hot-path changes that the machine's speed swings do not blur (the
# same binary gives the same count within about 0.5 %). It leaves out the kernel,
# which is most of the proxy's time (BENCHMARKS.md), so it says which way a change
# moves the code's own cost, not the throughput.
#
#   benches/load/instructions.sh BIN [N] [h1|h2|h1b] [CONF]
#
# Backend: nginx `return 200` on 127.0.0.1:19000 (backend.sh). BIN runs under
# `valgrind --tool=callgrind` with CONF (default instructions.toml: run.sh's scenario
# (a)); h2load sends 2,000 requests to warm up, the counters are zeroed, then N
# (default 20,000) over 64 connections (HTTP/1.1 with --h1, or h2c with 10 streams
# each), and the counters are dumped. h1b: HTTP/1.1 from wrk with scenario (b)'s Lua
# client instead (rotate_host.lua over HOT_TENANTS hosts, default 1000; without CONF,
# instructions.toml's config with TENANTS_B tenants t1..tN.example.com, default
# 10,000), for N seconds (default 8) after 3 s of warm-up, divided by the requests
# wrk counts. CACHESIM=1 adds callgrind's cache simulation and prints L1 and
# last-level misses per request too (CACHESIM_LL=size,assoc,line sets the simulated
# last level: 524288,8,64 for a Zen core's 512 KiB L2; the miss counts of one binary
# spread by about ±10 per request between runs, as the event loop's batching follows
# the machine's load, so compare binaries over several interleaved runs). Prints the
# count per request and the functions with the most instructions of their own; the
# dump stays in the printed directory. PORT_OFFSET=N (default 0) moves every port it
# uses (18080, 18081, 19000) up by N, so that two runs at once do not meet.
# Needs valgrind, nginx, h2load (nghttp2-client), wrk (h1b), curl and python3.
set -euo pipefail
[ $# -ge 1 ] || { sed -n 2,25p "$0"; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$(realpath "$1") N=${2:-20000} PROTO=${3:-h1} CONF=$(realpath "${4:-$HERE/instructions.toml}")
for t in valgrind callgrind_control callgrind_annotate nginx h2load curl python3; do
  command -v "$t" >/dev/null || {
    echo "missing $t: apt-get install -y valgrind nginx nghttp2-client curl" >&2
    exit 1
  }
done
case $PROTO in
  h1) LOAD=(--h1 -c64) ;;
  h2) LOAD=(-c64 -m10) ;;
  h1b)
    command -v wrk >/dev/null || { echo "missing wrk: apt-get install -y wrk" >&2; exit 1; }
    N=${2:-8}
    ;;
  *) echo "protocol must be h1, h2 or h1b" >&2; exit 2 ;;
esac
SIM=()
[ "${CACHESIM:-0}" = 1 ] && SIM=(--cache-sim=yes ${CACHESIM_LL:+"--LL=$CACHESIM_LL"})
TMP=$(mktemp -d); chmod 755 "$TMP"
if [ "$PROTO" = h1b ] && [ $# -lt 4 ]; then
  # Scenario (b)'s config: instructions.toml's with tenants t1..t$TENANTS_B.
  CONF=$TMP/tenants.toml
  { grep -v -e '^\[tenants\.' -e '^hosts = ' "$HERE/instructions.toml"
    awk -v n="${TENANTS_B:-10000}" 'BEGIN { for (i = 1; i <= n; i++)
      printf "\n[tenants.t%d]\nhosts = [\"t%d.example.com\"]\n", i, i }'
  } >"$CONF"
fi
OFF=${PORT_OFFSET:-0}
[[ $OFF =~ ^[0-9]+$ ]] && ((OFF <= 40000)) || { echo "PORT_OFFSET must be 0 to 40000" >&2; exit 2; }
PORT=$((18080 + OFF))
if ((OFF)); then
  sed -e "s/127.0.0.1:18080/127.0.0.1:$PORT/" -e "s/127.0.0.1:18081/127.0.0.1:$((18081 + OFF))/" \
    -e "s/127.0.0.1:19000/127.0.0.1:$((19000 + OFF))/" "$CONF" >"$TMP/ports.toml"
  CONF=$TMP/ports.toml
fi
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
# shellcheck source=benches/load/backend.sh
. "$HERE/backend.sh"
BACKEND_OFFSET=$OFF start_backend
OUT=$TMP/callgrind.out
RUST_LOG=warn valgrind --tool=callgrind "${SIM[@]}" --callgrind-out-file="$OUT" \
  "$BIN" run --no-watch --config "$CONF" >"$TMP/bulkhead.log" 2>&1 & PID=$!
PIDS+=("$PID")
for _ in $(seq 150); do
  curl -s -o /dev/null -H 'Host: t1.example.com' http://127.0.0.1:$PORT/ && break
  sleep 0.2
done
if [ "$PROTO" = h1b ]; then
  # wrk's options before the script's arguments (after `--`): the duration goes first.
  WRK=(-t1 -c64 -s "$HERE/rotate_host.lua" http://127.0.0.1:$PORT/ -- "${HOT_TENANTS:-1000}")
  wrk -d3s "${WRK[@]}" >/dev/null
  callgrind_control -z "$PID" >/dev/null
  wrk -d"${N}s" "${WRK[@]}" >"$TMP/wrk.out"
  callgrind_control -d "$PID" >/dev/null
  grep -E 'requests in|Non-2xx' "$TMP/wrk.out"
  N=$(awk '/requests in/ {print $1}' "$TMP/wrk.out")
else
  H2=(h2load -t1 "${LOAD[@]}" -H ':authority: t1.example.com' http://127.0.0.1:$PORT/)
  "${H2[@]}" -n 2000 >/dev/null
  callgrind_control -z "$PID" >/dev/null
  "${H2[@]}" -n "$N" | grep -E '^requests:'
  callgrind_control -d "$PID" >/dev/null
fi
kill -INT "$PID"; wait "$PID" 2>/dev/null || true
DUMP=$OUT.1
[ -s "$DUMP" ] || { echo "no callgrind dump in $TMP" >&2; exit 1; }
callgrind_annotate "$DUMP" 2>/dev/null | awk -v n="$N" '
  /^Events shown:/ { for (i = 3; i <= NF; i++) ev[i - 2] = $i }
  /PROGRAM TOTALS/ {
    gsub(",", "", $1); printf "instructions per request: %.0f\n", $1 / n
    if (ev[2] != "") {   # --cache-sim: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw
      printf "per request:"
      for (i = 4; i <= 9; i++) { v = $(2 * i - 1); gsub(",", "", v); printf " %s %.2f", ev[i], v / n }
      printf "\n"
    }
    exit }'
echo "functions with the most instructions of their own, per request:"
callgrind_annotate --show=Ir --inclusive=no --threshold=100 "$DUMP" 2>/dev/null | python3 -c '
import collections, re, sys
n = int(sys.argv[1])
own = collections.Counter()
for line in sys.stdin:
    m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+\S*?:(.+?)( \[.*\])?$", line)
    if m:
        own[m.group(2)] += int(m.group(1).replace(",", ""))
top = max(own.values(), default=0)
# The thread entry frames are listed with the whole count; they are not own work.
for f, c in [(f, c) for f, c in own.most_common(40) if c < 0.9 * top][:25]:
    print(f"{c / n:8.0f}  {f[:140]}")
' "$N"
echo "dump: $DUMP"
