#!/usr/bin/env bash
# HTTPS load benchmark (issue 8): Bulkhead, nginx and HAProxy terminating TLS 1.3
# with the same certificate, one after the other on one core with one worker.
#
# Scenarios (SCENARIOS, default "full resume h1 h2"):
#   full    a new TLS connection per request, full handshake (handshakes/s):
#           wrk -H "Connection: close", the client never offers a saved session
#   resume  the same, but the client resumes its last session (TLS 1.3 PSK + ECDHE),
#           as wrk does by default; each server resumes the way it does by default
#   h1      keep-alive HTTPS, HTTP/1.1 (wrk)
#   h2      HTTP/2 chosen by ALPN (h2load -m H2_STREAMS)
# Each measurement: WARMUP discarded, DURATION measured; REPEAT interleaved repeats,
# each proxy restarted per repeat; medians and Bulkhead/peer ratios are printed.
# See benches/load/README.md.
#
#   cargo build --release && benches/load/tls.sh              # ~7 min
#   DURATION=2s REPEAT=1 PROXIES="nginx haproxy" benches/load/tls.sh
#
# Installs nothing. Listens on and connects to 127.0.0.1 only. The client sends SNI
# t1.example.com: wrk runs in a private mount namespace (unshare -m) where a bind-
# mounted hosts file maps that name to 127.0.0.1 (the real /etc/hosts is untouched);
# h2load uses --connect-to.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PATH=$PATH:/usr/sbin:/sbin

# ---- knobs (environment) -----------------------------------------------------
BULKHEAD_BIN=${BULKHEAD_BIN:-$REPO/target/release/bulkhead}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-1s}
CONNS=${CONNS:-64}
H2_STREAMS=${H2_STREAMS:-10}
REPEAT=${REPEAT:-3}
SCENARIOS=${SCENARIOS:-full resume h1 h2}
PROXIES=${PROXIES:-bulkhead nginx haproxy}
KEY=${KEY:-ecdsa}                # ecdsa (P-256) or rsa (2048 bits)
KEEP_TMP=${KEEP_TMP:-0}
OUT=${OUT:-$HERE/results-tls-$(date +%Y-%m-%d-%H%M%S).md}

readonly ADDR=127.0.0.1
readonly HOST=t1.example.com     # SNI and Host; the tenant's name
readonly TLS_PORT=18443          # every proxy: HTTPS, HTTP/1.1 and h2 by ALPN
readonly PLAIN_PORT=18080        # Bulkhead's plain listener (unused, but required)
readonly ADMIN_PORT=18081        # Bulkhead admin
readonly BACKEND_PORT=19000      # backend.sh
readonly LOADGEN_CPU=0           # backend.sh pins the backend to CPU 0
readonly PROXY_CPU=1
readonly SUITE=TLS_AES_128_GCM_SHA256   # the one TLS 1.3 suite the clients offer

# shellcheck source=benches/load/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

check() {
  local missing=() t s p
  for t in nginx wrk h2load openssl taskset unshare python3 cc; do
    command -v "$t" >/dev/null || missing+=("$t")
  done
  [[ " $PROXIES " == *" haproxy "* ]] && ! command -v haproxy >/dev/null && missing+=(haproxy)
  if ((${#missing[@]})); then
    say "missing tools: ${missing[*]}"
    say "  apt-get install -y nginx haproxy wrk nghttp2-client openssl gcc   # + util-linux, python3"
    exit 1
  fi
  for s in $SCENARIOS; do
    [[ $s == full || $s == resume || $s == h1 || $s == h2 ]] ||
      die "unknown scenario '$s' (full resume h1 h2)"
  done
  for p in $PROXIES; do
    [[ $p == bulkhead || $p == nginx || $p == haproxy ]] || die "unknown proxy '$p'"
  done
  [[ $KEY == ecdsa || $KEY == rsa ]] || die "KEY must be ecdsa or rsa"
  for s in CONNS H2_STREAMS REPEAT; do
    [[ ${!s} =~ ^[1-9][0-9]*$ ]] || die "$s must be a positive integer, got '${!s}'"
  done
  secs "$DURATION" >/dev/null && secs "$WARMUP" >/dev/null
  ((PROXY_CPU < $(nproc))) || die "needs at least 2 CPUs"
  if [[ " $PROXIES " == *" bulkhead "* && ! -x $BULKHEAD_BIN ]]; then
    die "Bulkhead binary not found at $BULKHEAD_BIN: cargo build --release (or PROXIES=\"nginx haproxy\")"
  fi
}

# ---- certificate, client setup, configs ----------------------------------------
# One CA-signed certificate for t1.example.com (and *.example.com), served by all
# three proxies: cert.pem + key.pem (Bulkhead, nginx), the two concatenated (HAProxy).
make_cert() {
  local d=$TMP/pki alg
  mkdir -p "$d"
  if [[ $KEY == ecdsa ]]; then alg=(-newkey ec -pkeyopt ec_paramgen_curve:P-256)
  else alg=(-newkey rsa:2048); fi
  {
    openssl req -x509 "${alg[@]}" -nodes -keyout "$d/ca.key" -out "$d/ca.pem" -days 7 \
      -subj "/CN=Bulkhead benchmark CA"
    openssl req "${alg[@]}" -nodes -keyout "$d/key.pem" -out "$d/leaf.csr" -subj "/CN=$HOST"
    printf '%s\n' "subjectAltName=DNS:$HOST,DNS:*.example.com" "basicConstraints=CA:FALSE" \
      "keyUsage=digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" >"$d/leaf.ext"
    openssl x509 -req -in "$d/leaf.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
      -out "$d/cert.pem" -days 7 -extfile "$d/leaf.ext"
  } >"$d/openssl.log" 2>&1 || { cat "$d/openssl.log" >&2; die "openssl could not make the certificate"; }
  cat "$d/cert.pem" "$d/key.pem" >"$d/haproxy.pem"
  chmod 644 "$d"/*.pem   # nginx reads them as root, but keep it simple
}

# The clients: TLS 1.3 only, one suite (the servers then cannot differ in the suite
# they pick), X25519 as OpenSSL's first key share; the counting/no-resume shim.
setup_clients() {
  cat >"$TMP/client-openssl.cnf" <<EOF
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MinProtocol = TLSv1.3
Ciphersuites = $SUITE
EOF
  cc -O2 -shared -fPIC -o "$TMP/tls_client_shim.so" "$HERE/tls_client_shim.c" -ldl ||
    die "cannot build $HERE/tls_client_shim.c"
  printf '%s localhost\n%s %s\n' "$ADDR" "$ADDR" "$HOST" >"$TMP/hosts"
  # wrk takes the SNI from the URL's host, so the name must resolve.
  # shellcheck disable=SC2016  # $1 and $2 are the inner shell's
  if ! unshare -m sh -c 'mount --bind "$1" /etc/hosts && getent hosts "$2"' sh \
    "$TMP/hosts" "$HOST" >/dev/null 2>&1; then
    die "cannot map $HOST to $ADDR in a private mount namespace (unshare -m needs root or" \
      "CAP_SYS_ADMIN); add \"$ADDR $HOST\" to /etc/hosts and change WITH_HOSTS in this script"
  fi
}

write_bulkhead_conf() {
  cat >"$TMP/bulkhead.toml" <<EOF
# Bulkhead under test: one worker, TLS 1.3 only, the tenant's own certificate by
# SNI (the same files as the default), limits far above the load.
[server]
listen = "$ADDR:$PLAIN_PORT"
tls_listen = "$ADDR:$TLS_PORT"
admin_listen = "$ADDR:$ADMIN_PORT"
workers = 1
shutdown_grace = "2s"
header_read_timeout = "60s"
access_log = false

[server.tls]
default_cert = "$TMP/pki/cert.pem"
default_key = "$TMP/pki/key.pem"
min_version = "1.3"

[tenancy]
resolve = ["host"]

[defaults]
upstream = "backend"

[defaults.limits]
requests_per_second = 10000000
burst = 10000000

[upstreams.backend]
targets = ["$ADDR:$BACKEND_PORT"]

[tenants.t1]
hosts = ["$HOST"]

[tenants.t1.tls]
cert = "$TMP/pki/cert.pem"
key = "$TMP/pki/key.pem"
EOF
}

write_nginx_conf() {
  local d=$TMP/nginx
  mkdir -p "$d"
  cat >"$d/nginx.conf" <<EOF
# nginx under test: 1 worker, TLS 1.3 only, HTTP/1.1 and h2 by ALPN on one listener;
# Host -> tenant map, per-tenant limit_req far above the load, tenant header,
# upstream keep-alive (as run.sh). TLS session defaults: tickets on, no cache.
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    default_type text/plain;
    client_body_temp_path $d/client_body;
    proxy_temp_path $d/proxy;
    fastcgi_temp_path $d/fastcgi;
    uwsgi_temp_path $d/uwsgi;
    scgi_temp_path $d/scgi;
    keepalive_requests 1000000000;   # also caps requests per h2 connection
    keepalive_timeout 60s;
    client_header_timeout 60s;

    map \$host \$tenant {
        hostnames;
        default "";
        $HOST t1;
    }
    limit_req_zone \$tenant zone=t:10m rate=10000000r/s;
    limit_req_status 429;

    upstream backend {
        server $ADDR:$BACKEND_PORT;
        keepalive 64;
        keepalive_requests 1000000000;
        keepalive_timeout 60s;
    }

    server {
        listen $ADDR:$TLS_PORT ssl http2;   # nginx 1.22 syntax; ALPN h2, http/1.1
        server_name $HOST;
        ssl_certificate $TMP/pki/cert.pem;
        ssl_certificate_key $TMP/pki/key.pem;
        ssl_protocols TLSv1.3;
        if (\$tenant = "") { return 404; }
        location / {
            limit_req zone=t burst=10000000 nodelay;
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header x-tenant-id \$tenant;
        }
    }
}
EOF
}

write_haproxy_conf() {
  local d=$TMP/haproxy
  mkdir -p "$d"
  printf '%s t1\n' "$HOST" >"$d/hosts.map"
  cat >"$d/haproxy.cfg" <<EOF
# HAProxy under test: 1 thread, TLS 1.3 only, HTTP/1.1 and h2 by ALPN on one bind;
# Host -> tenant map, per-tenant request-rate check far above the load, tenant
# header, reused server connections (as run.sh). TLS session defaults: tickets on,
# session cache of 20,000.
global
    nbthread 1
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 60s
    timeout http-keep-alive 60s
    http-reuse always
frontend fe
    bind $ADDR:$TLS_PORT ssl crt $TMP/pki/haproxy.pem alpn h2,http/1.1 ssl-min-ver TLSv1.3
    http-request set-var(txn.tenant) req.hdr(host),field(1,:),lower,map_str($d/hosts.map)
    http-request deny deny_status 404 unless { var(txn.tenant) -m found }
    http-request track-sc0 var(txn.tenant) table per_tenant
    http-request deny deny_status 429 if { sc_http_req_rate(0) gt 10000000 }
    http-request set-header x-tenant-id %[var(txn.tenant)]
    default_backend backend
backend per_tenant
    stick-table type string len 64 size 100 expire 10s store http_req_rate(1s)
backend backend
    http-reuse always
    server b1 $ADDR:$BACKEND_PORT
EOF
}

validate_configs() {
  local out
  if [[ " $PROXIES " == *" bulkhead "* ]]; then
    out=$(RUST_LOG=warn "$BULKHEAD_BIN" check --config "$TMP/bulkhead.toml" 2>&1) ||
      die "bulkhead check: $out"
  fi
  if [[ " $PROXIES " == *" nginx "* ]]; then
    out=$(nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/error.log" -t -q 2>&1) ||
      die "nginx config: $out"
  fi
  if [[ " $PROXIES " == *" haproxy "* ]]; then
    out=$(haproxy -c -q -f "$TMP/haproxy/haproxy.cfg" 2>&1) || die "haproxy config: $out"
  fi
}

# ---- proxies -----------------------------------------------------------------
PROXY_PID="" MEASURE_PID=""
start_proxy() { # name
  local log i
  case $1 in
    bulkhead)
      log=$TMP/bulkhead.log
      spawn "$log" env RUST_LOG=warn taskset -c "$PROXY_CPU" \
        "$BULKHEAD_BIN" run --no-watch --config "$TMP/bulkhead.toml"
      PROXY_PID=$BG_PID MEASURE_PID=$BG_PID ;;
    nginx)
      log=$TMP/nginx/error.log
      spawn "$TMP/nginx/stdout.log" taskset -c "$PROXY_CPU" \
        nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$log"
      PROXY_PID=$BG_PID MEASURE_PID="" ;;
    haproxy)
      log=$TMP/haproxy/haproxy.log
      spawn "$log" taskset -c "$PROXY_CPU" haproxy -db -f "$TMP/haproxy/haproxy.cfg"
      PROXY_PID=$BG_PID MEASURE_PID=$BG_PID ;;
  esac
  wait_port "$TLS_PORT" "$PROXY_PID" "$1" "$log" || return 1
  if [[ $1 == nginx ]]; then   # the master only supervises; measure the worker
    for ((i = 0; i < 50; i++)); do
      MEASURE_PID=$(pgrep -P "$PROXY_PID" | head -n 1 || true)
      [[ -n $MEASURE_PID ]] && break
      sleep 0.1
    done
    [[ -n $MEASURE_PID ]] || { warn "nginx worker not found"; return 1; }
    PIDS+=("$MEASURE_PID")
  fi
}

stop_proxy() {
  [[ -n $PROXY_PID ]] || return 0
  local worker=$MEASURE_PID
  stop_pid "$PROXY_PID"
  [[ -n $worker && $worker != "$PROXY_PID" ]] && stop_pid "$worker"
  wait_port_closed "$TLS_PORT"
  PROXY_PID="" MEASURE_PID=""
}

# What the handshake settles on, once per proxy: protocol, suite, key exchange,
# signature, certificate, ALPN; and whether a saved session is resumed.
probe_proxy() { # name
  local out=$TMP/runs/probe-$1.txt sess=$TMP/runs/probe-$1.sess
  local get='GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n'
  local sc=(env OPENSSL_CONF="$TMP/client-openssl.cnf" timeout 10 openssl s_client
            -connect "$ADDR:$TLS_PORT" -servername "$HOST" -CAfile "$TMP/pki/ca.pem")
  {
    echo "--- ALPN h2,http/1.1"
    "${sc[@]}" -alpn h2,http/1.1 </dev/null 2>&1
    # -ign_eof: wait for the response, and with it the session tickets.
    echo "--- GET over http/1.1, session saved"
    # shellcheck disable=SC2059  # the format is ours
    printf "$get" "$HOST" | "${sc[@]}" -alpn http/1.1 -ign_eof -sess_out "$sess" 2>&1
    echo "--- GET again, offering the saved session"
    # shellcheck disable=SC2059
    printf "$get" "$HOST" | "${sc[@]}" -alpn http/1.1 -ign_eof -sess_in "$sess" 2>&1
  } >"$out" || true
  awk -v p="$1" '
    /^--- / { part++ }
    part == 1 && /^New, / { split($0, a, ", "); proto = a[2]; suite = a[3]; sub(/^Cipher is /, "", suite) }
    part == 1 && /^Server Temp Key:/ { kx = $4; sub(/,$/, "", kx) }
    part == 1 && /^Peer signature type:/ { sig = $4 }
    part == 1 && /^subject=/ { subj = $0; sub(/^subject=/, "", subj) }
    part == 1 && /^ALPN protocol:/ { alpn = $3 }
    part == 1 && /^Verify return code:/ { vrc = $4 }
    part == 2 && /^HTTP\/1.1 / { status = $2 }
    part == 3 && /^Reused, / { reused = "yes" }
    END {
      OFS = "\t"
      print p, proto, suite, kx, sig, subj, alpn, (vrc == "0" ? "ok" : "FAILED"), status, (reused ? "yes" : "no")
    }' "$out" >>"$PROBE"
}

# ---- load --------------------------------------------------------------------
parse_wrk() { # -> "requests rps p50_ms p99_ms errors"
  awk '
    function ms(v) {
      if (v ~ /us$/) { sub(/us$/, "", v); return v / 1000 }
      if (v ~ /ms$/) { sub(/ms$/, "", v); return v + 0 }
      if (v ~ /m$/)  { sub(/m$/, "", v);  return v * 60000 }
      if (v ~ /s$/)  { sub(/s$/, "", v);  return v * 1000 }
      return v + 0
    }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    / requests in / { n = $1 }
    $1 == "Requests/sec:" { rps = $2 }
    /Non-2xx or 3xx responses:/ { err += $NF }
    /Socket errors:/ { gsub(/,/, ""); err += $4 + $6 + $8 + $10 }
    END {
      if (rps == "") print "- - - - 1"
      else printf "%s %s %.4f %.4f %d\n", n, rps, p50, p99, err
    }' "$1"
}

parse_h2load() { # output logfile -> "requests rps p50_ms p99_ms errors"
  local n rps err pct
  rps=$(awk '/^finished in/ { print $4 }' "$1")
  n=$(awk '/^requests:/ { print $8 }' "$1")
  err=$(awk '
    /^requests:/ { e += $10 + $12 + $14 }
    /^status codes:/ { gsub(/,/, ""); e += $5 + $7 + $9 }
    END { print e + 0 }' "$1")
  pct=$(awk -F'\t' '$2 != -1 { print $3 }' "$2" 2>/dev/null | sort -n | awk '
    { v[NR] = $1 }
    END {
      if (NR == 0) { print "- -"; exit }
      i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++
      i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++
      printf "%.4f %.4f\n", v[i50] / 1000, v[i99] / 1000
    }')
  [[ -n $rps ]] || { echo "- - - - 1"; return; }
  echo "$n $rps $pct $err"
}

CMD=()
load_cmd() { # scen dur stats h2log: fills CMD
  local scen=$1 dur=$2 stats=$3 h2log=$4 url="https://$HOST:$TLS_PORT/" no_resume=0
  [[ $scen == full ]] && no_resume=1
  CMD=(env OPENSSL_CONF="$TMP/client-openssl.cnf" TLS_SHIM_STATS="$stats"
       TLS_SHIM_NO_RESUME="$no_resume" LD_PRELOAD="$TMP/tls_client_shim.so"
       taskset -c "$LOADGEN_CPU")
  case $scen in
    full | resume | h1)
      local close=()
      [[ $scen != h1 ]] && close=(-H "Connection: close")
      # The private hosts file is mounted first; the shim counts wrk's handshakes only.
      # shellcheck disable=SC2016  # $0 and $@ are the inner shell's
      CMD=(unshare -m sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$TMP/hosts"
           "${CMD[@]}" wrk -t1 -c"$CONNS" -d"$dur" --latency ${close[@]+"${close[@]}"} "$url") ;;
    h2)
      CMD+=(h2load -t1 -c"$CONNS" -m"$H2_STREAMS" -D "$(secs "$dur")" --tls13-ciphers="$SUITE"
            --connect-to="$ADDR:$TLS_PORT" --log-file="$h2log" "$url") ;;
  esac
}

measure() { # scen proxy rep
  local scen=$1 proxy=$2 rep=$3 out stats h2log c0="" c1="" b0 b1 t0 t1 cpu=- other res
  out=$TMP/runs/$scen-$proxy-$rep.txt stats=$out.tls h2log=$out.h2log
  load_cmd "$scen" "$WARMUP" "$stats.warmup" "$h2log"
  run_fg "$out.warmup" "${CMD[@]}" || true
  load_cmd "$scen" "$DURATION" "$stats" "$h2log"
  c0=$(cpu_ticks "$MEASURE_PID")
  b0=$(core_busy_ticks "$PROXY_CPU"); t0=$(date +%s.%N)
  run_fg "$out" "${CMD[@]}" || warn "$scen/$proxy: load generator failed (see $out)"
  b1=$(core_busy_ticks "$PROXY_CPU"); t1=$(date +%s.%N)
  proxy_alive && c1=$(cpu_ticks "$MEASURE_PID")
  if [[ -n $c1 ]]; then
    cpu=$(awk -v c="$((c1 - c0))" -v hz="$CLK_TCK" -v t0="$t0" -v t1="$t1" \
      'BEGIN { printf "%.1f", 100 * c / hz / (t1 - t0) }')
  fi
  other=$(awk -v b="$((b1 - b0))" -v c="$((${c1:-0} - ${c0:-0}))" -v hz="$CLK_TCK" \
    -v t0="$t0" -v t1="$t1" 'BEGIN { x = 100 * (b - c) / hz / (t1 - t0); printf "%.1f", x < 0 ? 0 : x }')
  if [[ $scen == h2 ]]; then res=$(parse_h2load "$out" "$h2log"); else res=$(parse_wrk "$out"); fi
  rm -f "$h2log"
  proxy_alive || { warn "$proxy died during $scen; see $TMP"; res="- - - - 1"; }
  local n rps p50 p99 err hs=- resumed=- flag=""
  read -r n rps p50 p99 err <<<"$res"
  if [[ -s $stats ]]; then read -r _ hs _ resumed <"$stats"; fi
  ((err)) && flag="  ERRORS: $err"
  awk -v o="$other" 'BEGIN { exit !(o >= 5) }' &&
    flag="$flag  NOISY: ${other}% of CPU $PROXY_CPU used by other processes"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scen" "$proxy" "$rep" "$rps" \
    "$p50" "$p99" "$cpu" "$err" "$other" "$n" "$hs" "$resumed" >>"$RAW"
  printf '  %-6s %-8s rep %d/%d %10s req/s  p50 %8s ms  p99 %8s ms  cpu %5s%%  %s handshakes (%s resumed) for %s requests%s\n' \
    "$scen" "$proxy" "$rep" "$REPEAT" "$rps" "$p50" "$p99" "$cpu" "$hs" "$resumed" "$n" "$flag"
}

# ---- report --------------------------------------------------------------------
the_command() {
  printf 'DURATION=%s WARMUP=%s CONNS=%s H2_STREAMS=%s REPEAT=%s SCENARIOS="%s" PROXIES="%s" KEY=%s benches/load/tls.sh' \
    "$DURATION" "$WARMUP" "$CONNS" "$H2_STREAMS" "$REPEAT" "$SCENARIOS" "$PROXIES" "$KEY"
}

BUSY_NOTE=""
busy_check() {
  local a b pct
  a=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)
  sleep 1
  b=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)
  pct=$(awk -v a="$a" -v b="$b" 'BEGIN {
    split(a, x, " "); split(b, y, " ")
    printf "%.0f", (y[2] > x[2]) ? 100 * (y[1] - x[1]) / (y[2] - x[2]) : 0 }')
  if ((pct >= 10)); then
    BUSY_NOTE="the machine was ${pct}% busy with other work when the run started: figures are noisy"
    warn "$BUSY_NOTE"
  fi
}

versions() {
  echo "- repository: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')" \
    "($(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) uncommitted paths)"
  [[ " $PROXIES " == *" bulkhead "* ]] &&
    echo "- bulkhead: $("$BULKHEAD_BIN" --version 2>&1 | head -n 1)," \
      "rustls $(awk '/^name = "rustls"$/ { getline; gsub(/"/, "", $3); print $3 }' "$REPO/Cargo.lock") (ring)"
  echo "- nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //')" \
    "($(nginx -V 2>&1 | sed -n 's/.*(\(running with OpenSSL [^ ]*\).*/\1/p; s/^built with \(OpenSSL [^ ]*\)[^(]*$/\1/p'))"
  [[ " $PROXIES " == *" haproxy "* ]] &&
    echo "- haproxy: $(haproxy -v 2>&1 | head -n 1 | awk '{print $3}')" \
      "($(haproxy -vv 2>&1 | awk -F': ' '/^Running on OpenSSL version/ { print "running on " $2 }'))"
  echo "- clients: wrk $(wrk -v 2>&1 | head -n 1 | awk '{print $2}'), $(h2load --version 2>&1 | head -n 1)," \
    "$(openssl version | awk '{print $1, $2}')"
  echo "- machine: $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), Linux $(uname -r)"
}

write_markdown() {
  {
    echo "# Bulkhead HTTPS load benchmark — $(date -u +'%Y-%m-%d %H:%M UTC')"
    echo
    echo '```'; the_command; echo; echo '```'
    echo
    versions
    echo "- pinning: backend nginx (backend.sh) and the load generator on CPU $LOADGEN_CPU;" \
      "the proxy under test on CPU $PROXY_CPU, one worker"
    echo "- certificate: $([[ $KEY == ecdsa ]] && echo 'ECDSA P-256' || echo 'RSA 2048'), CA-signed," \
      "leaf only; TLS 1.3; clients offer only $SUITE and an X25519 key share"
    [[ -n $BUSY_NOTE ]] && echo "- **warning: $BUSY_NOTE**"
    echo "- load: $CONNS connections, $DURATION per run after a $WARMUP warm-up, medians of $REPEAT interleaved repeats"
    echo
    python3 "$HERE/tls_report.py" md "$RAW" "$PROBE"
    echo
    echo "<details><summary>raw runs</summary>"
    echo
    echo '```'
    printf 'scenario\tproxy\trep\treq/s\tp50_ms\tp99_ms\tcpu%%\terrors\tother_cpu%%\trequests\thandshakes\tresumed\n'
    cat "$RAW"
    echo '```'
    echo
    echo "</details>"
  } >"$OUT"
}

# ---- main ----------------------------------------------------------------------
main() {
  check
  [[ $BULKHEAD_BIN == /* ]] || BULKHEAD_BIN=$PWD/$BULKHEAD_BIN
  ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true
  CLK_TCK=$(getconf CLK_TCK)
  busy_check
  local p
  for p in $TLS_PORT $PLAIN_PORT $ADMIN_PORT $BACKEND_PORT; do
    port_open "$p" && die "$ADDR:$p is already in use; stop whatever listens there first"
  done

  TMP=$(mktemp -d /tmp/bulkhead-tls.XXXXXX)
  chmod 755 "$TMP"   # nginx workers run unprivileged when started as root
  mkdir -p "$TMP/runs"
  RAW=$TMP/raw.tsv PROBE=$TMP/probe.tsv
  : >"$RAW"; : >"$PROBE"
  make_cert
  setup_clients
  write_bulkhead_conf; write_nginx_conf; write_haproxy_conf
  validate_configs

  # shellcheck source=benches/load/backend.sh
  . "$HERE/backend.sh"
  start_backend
  wait_port "$BACKEND_PORT" "${PIDS[-1]}" backend "$TMP/error.log" || exit 1
  say "configs in $TMP; backend on $ADDR:$BACKEND_PORT (CPU $LOADGEN_CPU);" \
    "proxies on https://$HOST:$TLS_PORT (CPU $PROXY_CPU); scenarios: $SCENARIOS"

  local rep proxy scen
  for ((rep = 1; rep <= REPEAT; rep++)); do
    for proxy in $PROXIES; do
      if ! start_proxy "$proxy"; then
        stop_proxy || true; warn "skipping $proxy for rep $rep"; continue
      fi
      ((rep == 1)) && probe_proxy "$proxy"
      for scen in $SCENARIOS; do measure "$scen" "$proxy" "$rep"; done
      stop_proxy
    done
  done

  say ""
  python3 "$HERE/tls_report.py" text "$RAW" "$PROBE"
  write_markdown
  say ""
  say "command: $(the_command)"
  say "markdown report: $OUT"
}

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
main "$@"
