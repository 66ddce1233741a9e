#!/usr/bin/env bash
# Bulkhead load benchmark against nginx and HAProxy (issue 7).
#
# One backend (nginx `return 200`) and the load generator share one core; each
# proxy runs in turn on the other core with one worker. Every measurement is
# repeated REPEAT times, repeats interleaved across proxies, and the medians
# are printed as one table of req/s, p50, p99 and Bulkhead/peer ratios, plus
# the direct-to-backend ceiling and (HTTP/1.1) the l4 reference: HAProxy in mode
# tcp, a forwarder doing no HTTP work. See benches/load/README.md.
#
#   benches/load/run.sh                                   # everything, ~15 min
#   DURATION=2s REPEAT=1 SCENARIOS=a PROXIES="nginx haproxy" benches/load/run.sh
#
# Installs nothing. Listens on and connects to 127.0.0.1 only.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PATH=$PATH:/usr/sbin:/sbin

# ---- knobs (environment) -----------------------------------------------------
BULKHEAD_BIN=${BULKHEAD_BIN:-$REPO/target/release/bulkhead}
DURATION=${DURATION:-10s}        # per measured run (wrk -d, h2load -D)
WARMUP=${WARMUP:-1s}             # unmeasured run before each measured one
CONNS=${CONNS:-64}               # client connections
H2_STREAMS=${H2_STREAMS:-10}     # h2load -m: concurrent streams per connection
REPEAT=${REPEAT:-3}
SCENARIOS=${SCENARIOS:-a b c d}
PROXIES=${PROXIES:-bulkhead nginx haproxy}
PROTOCOLS=${PROTOCOLS:-h1 h2}
TENANTS_B=${TENANTS_B:-10000}    # tenants configured in scenario b
HOT_TENANTS=${HOT_TENANTS:-1000} # tenants the scenario-b HTTP/1.1 load rotates over
IDLE_CONNS=${IDLE_CONNS:-10000}  # scenario d
PACE_MS=${PACE_MS:-1}            # scenario f: each connection's wait between requests (ms)
RATE=${RATE:-70000}              # scenario g: requests a second offered to every proxy alike
LOADGEN_CPU=${LOADGEN_CPU:-0}    # backend + wrk/h2load/idle_conns.py
PROXY_CPU=${PROXY_CPU:-1}        # the proxy under test
KEEP_TMP=${KEEP_TMP:-0}          # 1: keep the temp dir (configs, logs, raw tool output)
PAIRED=${PAIRED:-0}              # 1: repeats outermost; each proxy's (a), (b), (c) back to back
L4=${L4:-1}                      # 1: also HAProxy in mode tcp (HTTP/1.1): a forwarder doing no
                                 # HTTP work, the most any proxy can reach on this layout
PROXY_CPU_QUOTA=${PROXY_CPU_QUOTA:-}  # N: each proxy gets N % of its core (a cgroup's CPU
                                 # quota, 10 ms period), so that every proxy, not the
                                 # load generator's core, is the limit: req/s then
                                 # compares their CPU cost (p50/p99 do not mean much)
CAPTURE=${CAPTURE:-0}            # 1: after scenarios a, f and g, one more run of each per proxy
                                 # with tcpdump on loopback for CAPTURE_SECS, and the time each
                                 # request spent in the proxy, the backend and on the wire
                                 # (residence.py; needs tcpdump and root or CAP_NET_RAW)
CAPTURE_SECS=${CAPTURE_SECS:-1}
SAME_HEADERS=${SAME_HEADERS:-0}  # 1: nginx and HAProxy also send the backend what Bulkhead sends
                                 # (x-request-id, generated, and back on the response;
                                 # x-forwarded-for, -proto and -host): the backend then
                                 # parses the same head behind every proxy
OUT=${OUT:-$HERE/results-$(date +%Y-%m-%d-%H%M%S).md}

readonly ADDR=127.0.0.1          # the only address this script listens on or connects to
readonly PROXY_PORT=18080        # every proxy: HTTP/1.1 (Bulkhead: h2c too, same listener)
readonly ADMIN_PORT=18081        # Bulkhead admin listener
readonly PROXY_H2_PORT=18082     # nginx and HAProxy: h2c (prior knowledge) listener
readonly BACKEND_PORT=19000      # backend HTTP/1.1 (what every proxy forwards to)
readonly BACKEND_H2_PORT=19001   # backend h2c, for the direct h2 ceiling only

# shellcheck source=benches/load/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---- tools -------------------------------------------------------------------
check_tools() {
  local missing=() t
  for t in nginx wrk taskset python3; do command -v "$t" >/dev/null || missing+=("$t"); done
  [[ " $PROXIES " == *" haproxy "* ]] && ! command -v haproxy >/dev/null && missing+=(haproxy)
  [[ " $PROTOCOLS " == *" h2 "* || " $SCENARIOS " == *" g "* ]] && ! command -v h2load >/dev/null &&
    missing+=(h2load)
  ((CAPTURE)) && ! command -v tcpdump >/dev/null && missing+=(tcpdump)
  if ((${#missing[@]})); then
    say "missing tools: ${missing[*]}"
    say "install them with (Debian/Ubuntu):"
    say "  apt-get install -y nginx haproxy wrk nghttp2-client   # taskset: util-linux, python3: python3"
    ((CAPTURE)) && say "  apt-get install -y tcpdump   # CAPTURE=1"
    say "(this script installs nothing itself)"
    exit 1
  fi
  if [[ " $PROXIES " == *" bulkhead "* && ! -x $BULKHEAD_BIN ]]; then
    say "Bulkhead binary not found at $BULKHEAD_BIN"
    say "build it first:  cargo build --release"
    say "(or set BULKHEAD_BIN, or leave bulkhead out: PROXIES=\"nginx haproxy\")"
    exit 1
  fi
}

check_knobs() {
  local s p
  for s in $SCENARIOS; do [[ $s == [abcdfg] || $s == a1 ]] || die "unknown scenario '$s' (a a1 b c d f g)"; done
  for p in $PROXIES; do
    [[ $p == bulkhead || $p == nginx || $p == haproxy ]] || die "unknown proxy '$p'"
  done
  for p in $PROTOCOLS; do [[ $p == h1 || $p == h2 ]] || die "unknown protocol '$p' (h1 h2)"; done
  [[ $PAIRED == 0 || $PAIRED == 1 ]] || die "PAIRED must be 0 or 1, got '$PAIRED'"
  [[ $L4 == 0 || $L4 == 1 ]] || die "L4 must be 0 or 1, got '$L4'"
  [[ $CAPTURE == 0 || $CAPTURE == 1 ]] || die "CAPTURE must be 0 or 1, got '$CAPTURE'"
  [[ $SAME_HEADERS == 0 || $SAME_HEADERS == 1 ]] || die "SAME_HEADERS must be 0 or 1, got '$SAME_HEADERS'"
  for s in CONNS H2_STREAMS REPEAT TENANTS_B HOT_TENANTS IDLE_CONNS LOADGEN_CPU PROXY_CPU PACE_MS RATE CAPTURE_SECS; do
    [[ ${!s} =~ ^[0-9]+$ ]] || die "$s must be a non-negative integer, got '${!s}'"
  done
  ((REPEAT >= 1 && CONNS >= 1)) || die "REPEAT and CONNS must be at least 1"
  ((PACE_MS >= 1 && PACE_MS <= 1000)) || die "PACE_MS must be between 1 and 1000"
  ((RATE >= CONNS)) || die "RATE must be at least CONNS (one request a second per connection)"
  ((HOT_TENANTS >= 1 && HOT_TENANTS <= TENANTS_B)) || die "need 1 <= HOT_TENANTS <= TENANTS_B"
  secs "$DURATION" >/dev/null && secs "$WARMUP" >/dev/null
  if ((CAPTURE)); then
    ((CAPTURE_SECS >= 1 && CAPTURE_SECS < $(secs "$DURATION"))) ||
      die "CAPTURE_SECS must be at least 1 and shorter than DURATION"
    [[ " $SCENARIOS " == *" "[afg]" "* ]] && [[ " $PROTOCOLS " == *" h1 "* ]] ||
      die "CAPTURE=1 captures scenarios a, f and g over HTTP/1.1: add one to SCENARIOS, h1 to PROTOCOLS"
  fi
  local cpus; cpus=$(nproc)
  ((LOADGEN_CPU < cpus && PROXY_CPU < cpus)) || die "LOADGEN_CPU/PROXY_CPU must be < $cpus"
  ((LOADGEN_CPU != PROXY_CPU)) || warn "load generator and proxy share CPU $PROXY_CPU"
}

# ---- processes ---------------------------------------------------------------
children() { pgrep -P "$1" || true; }

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || true; }

# ---- configs -----------------------------------------------------------------
tenant_list() { # n: "i" per line
  awk -v n="$1" 'BEGIN { for (i = 1; i <= n; i++) print i }'
}

write_backend_conf() { # dir
  local d=$1
  mkdir -p "$d"
  cat >"$d/nginx.conf" <<EOF
# Backend: answers every request (GET or POST) with 200 "hello, world\n" (13 bytes).
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile $NOFILE;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 4096; }
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
    server {
        listen $ADDR:$BACKEND_PORT;
        listen $ADDR:$BACKEND_H2_PORT http2;   # h2c prior knowledge, direct ceiling only
        location / { return 200 "hello, world\n"; }
    }
}
EOF
}

write_bulkhead_conf() { # file ntenants
  {
    cat <<EOF
# Bulkhead under test: one worker, limits far above the load.
[server]
listen = "$ADDR:$PROXY_PORT"
admin_listen = "$ADDR:$ADMIN_PORT"
workers = 1
shutdown_grace = "2s"
header_read_timeout = "60s"   # as nginx client_header_timeout / HAProxy timeout http-request
access_log = false            # as "access_log off" in the nginx and HAProxy configs
max_connections = $((IDLE_CONNS + 2000))   # as worker_connections / maxconn in theirs

[tenancy]
resolve = ["host"]

[defaults]
upstream = "backend"

[defaults.limits]
requests_per_second = 10000000
burst = 10000000

[upstreams.backend]
targets = ["$ADDR:$BACKEND_PORT"]
EOF
    tenant_list "$2" | awk '{ printf "\n[tenants.t%s]\nhosts = [\"t%s.example.com\"]\n", $1, $1 }'
  } >"$1"
}

# A third argument "rid": the request id (nginx's $request_id) sent to the backend and
# back to the client as x-request-id, as Bulkhead does, so that CAPTURE can tie a
# client's exchange to the backend's.
# "same": that, and the x-forwarded-* headers Bulkhead sends (SAME_HEADERS=1).
write_nginx_conf() { # dir ntenants [rid|same]
  local d=$1 rid=""
  [[ ${3:-} == rid || ${3:-} == same ]] && rid='proxy_set_header x-request-id $request_id;
            add_header x-request-id $request_id always;'
  [[ ${3:-} == same ]] && rid="$rid"'
            proxy_set_header x-forwarded-host $host;
            proxy_set_header x-forwarded-proto $scheme;
            proxy_set_header x-forwarded-for $proxy_add_x_forwarded_for;'
  mkdir -p "$d"
  {
    cat <<EOF
# nginx as the proxy under test: 1 worker, Host -> tenant map, per-tenant
# limit_req far above the load, tenant header injected, upstream keep-alive.
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile $NOFILE;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections $((IDLE_CONNS + 2000)); }
http {
    access_log off;
    default_type text/plain;
    client_body_temp_path $d/client_body;
    proxy_temp_path $d/proxy;
    fastcgi_temp_path $d/fastcgi;
    uwsgi_temp_path $d/uwsgi;
    scgi_temp_path $d/scgi;
    keepalive_requests 1000000000;   # nginx < 1.19.7 defaults to 100, later to 1000 (h2 too)
    keepalive_timeout 60s;
    client_header_timeout 60s;

    map_hash_max_size 65536;
    map_hash_bucket_size 128;
    map \$host \$tenant {
        hostnames;
        default "";
EOF
    tenant_list "$2" | awk '{ printf "        t%s.example.com t%s;\n", $1, $1 }'
    cat <<EOF
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
        listen $ADDR:$PROXY_PORT;
        # nginx 1.22 speaks h2c (prior knowledge) only on a listener marked
        # http2, and then only h2c: so HTTP/2 gets its own port.
        listen $ADDR:$PROXY_H2_PORT http2;
        if (\$tenant = "") { return 404; }   # unknown tenant, as Bulkhead
        location / {
            limit_req zone=t burst=10000000 nodelay;
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header x-tenant-id \$tenant;
            $rid
        }
    }
}
EOF
  } >"$d/nginx.conf"
}

# A third argument "rid": a request id sent both ways as x-request-id (see nginx's);
# "same": that, and the x-forwarded-* headers Bulkhead sends (SAME_HEADERS=1).
write_haproxy_conf() { # dir ntenants [rid|same]
  local d=$1 rid=""
  [[ ${3:-} == rid || ${3:-} == same ]] && rid='unique-id-format %{+X}o%rt
    http-request set-header x-request-id %[unique-id]
    http-response set-header x-request-id %[unique-id]'
  [[ ${3:-} == same ]] && rid="$rid"'
    http-request set-header x-forwarded-host %[req.hdr(host)]
    http-request set-header x-forwarded-proto http
    option forwardfor'
  mkdir -p "$d"
  tenant_list "$2" | awk '{ printf "t%s.example.com t%s\n", $1, $1 }' >"$d/hosts.map"
  cat >"$d/haproxy.cfg" <<EOF
# HAProxy as the proxy under test: 1 thread, Host -> tenant map, per-tenant
# request-rate check far above the load, tenant header injected, reused
# server connections.
global
    nbthread 1
    maxconn $((IDLE_CONNS + 2000))
    # HAProxy sizes its descriptor needs as if every client connection had a
    # server one too (2 x maxconn); scenario d's idle clients do not, so run
    # within the shell's limit instead of refusing to start.
    ulimit-n $NOFILE
    no strict-limits

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 60s
    timeout http-keep-alive 60s
    http-reuse always

frontend fe
    bind $ADDR:$PROXY_PORT
    bind $ADDR:$PROXY_H2_PORT proto h2
    maxconn $((IDLE_CONNS + 2000))
    http-request set-var(txn.tenant) req.hdr(host),field(1,:),lower,map_str($d/hosts.map)
    http-request deny deny_status 404 unless { var(txn.tenant) -m found }
    http-request track-sc0 var(txn.tenant) table per_tenant
    http-request deny deny_status 429 if { sc_http_req_rate(0) gt 10000000 }
    http-request set-header x-tenant-id %[var(txn.tenant)]
    $rid
    default_backend backend

backend per_tenant
    stick-table type string len 64 size $((TENANTS_B * 2)) expire 10s store http_req_rate(1s)

backend backend
    http-reuse always
    server b1 $ADDR:$BACKEND_PORT
EOF
}

# The reference forwarder: HAProxy, 1 thread, in mode tcp, each client connection
# spliced to its own backend connection. The same four system calls per request as
# an HTTP proxy (read the client, write the backend, read it, write the client) and
# no HTTP work at all, so its req/s is about the most a proxy can reach here.
write_l4_conf() { # dir
  mkdir -p "$1"
  cat >"$1/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $((CONNS + 2000))

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend fe
    bind $ADDR:$PROXY_PORT
    default_backend backend

backend backend
    server b1 $ADDR:$BACKEND_PORT
EOF
}

write_configs() {
  local n
  [[ " $REFS " == *" l4 "* ]] && write_l4_conf "$TMP/l4"
  local same=""
  ((SAME_HEADERS)) && same=same
  for n in 1 "$TENANTS_B"; do
    [[ " $PROXIES " == *" bulkhead "* ]] && write_bulkhead_conf "$TMP/bulkhead-$n.toml" "$n"
    [[ " $PROXIES " == *" nginx "* ]] && write_nginx_conf "$TMP/nginx-$n" "$n" $same
    [[ " $PROXIES " == *" haproxy "* ]] && write_haproxy_conf "$TMP/haproxy-$n" "$n" $same
  done
  if ((CAPTURE)); then
    # One tenant, as (a); x-request-id both ways (Bulkhead sends it by default).
    [[ " $PROXIES " == *" bulkhead "* ]] && write_bulkhead_conf "$TMP/bulkhead-cap.toml" 1
    [[ " $PROXIES " == *" nginx "* ]] && write_nginx_conf "$TMP/nginx-cap" 1 rid
    [[ " $PROXIES " == *" haproxy "* ]] && write_haproxy_conf "$TMP/haproxy-cap" 1 rid
  fi
  write_backend_conf "$TMP/backend"
  head -c 1024 /dev/zero | tr '\0' x >"$TMP/body-1k"
  return 0
}

# NGINX=(...) runs the nginx whose prefix, config and error log live in dir.
nginx_args() { NGINX=(nginx -p "$1" -c "$1/nginx.conf" -e "$1/error.log"); }

validate_configs() {
  local n out
  nginx_args "$TMP/backend"
  out=$("${NGINX[@]}" -t -q 2>&1) || die "backend nginx config: $out"
  if [[ " $REFS " == *" l4 "* ]]; then
    out=$(haproxy -c -q -f "$TMP/l4/haproxy.cfg" 2>&1) || die "haproxy (l4) config: $out"
  fi
  local sets=(1 "$TENANTS_B")
  ((CAPTURE)) && sets+=(cap)
  for n in "${sets[@]}"; do
    if [[ " $PROXIES " == *" nginx "* ]]; then
      nginx_args "$TMP/nginx-$n"
      out=$("${NGINX[@]}" -t -q 2>&1) || die "nginx config ($n tenants): $out"
    fi
    if [[ " $PROXIES " == *" haproxy "* ]]; then
      out=$(haproxy -c -q -f "$TMP/haproxy-$n/haproxy.cfg" 2>&1) ||
        die "haproxy config ($n tenants): $out"
    fi
    if [[ " $PROXIES " == *" bulkhead "* ]]; then
      out=$(RUST_LOG=warn "$BULKHEAD_BIN" check --config "$TMP/bulkhead-$n.toml" 2>&1) ||
        die "bulkhead check ($n tenants): $out"
    fi
  done
}

# ---- starting and stopping the proxies --------------------------------------
BACKEND_PID=""
start_backend() {
  nginx_args "$TMP/backend"
  spawn "$TMP/backend/stdout.log" taskset -c "$LOADGEN_CPU" "${NGINX[@]}"
  BACKEND_PID=$BG_PID
  wait_port "$BACKEND_PORT" "$BACKEND_PID" backend "$TMP/backend/error.log" || exit 1
  wait_port "$BACKEND_H2_PORT" "$BACKEND_PID" backend "$TMP/backend/error.log" || exit 1
}

# start_proxy NAME NTENANTS: sets PROXY_PID (what we stop), MEASURE_PID (whose
# CPU and RSS we read), H1_PORT and H2_PORT. "direct" starts nothing.
PROXY_PID="" MEASURE_PID="" H1_PORT="" H2_PORT=""
start_proxy() {
  local name=$1 n=$2 log i
  PROXY_PID="" MEASURE_PID=""
  H1_PORT=$PROXY_PORT H2_PORT=$PROXY_H2_PORT
  case $name in
    direct)
      H1_PORT=$BACKEND_PORT H2_PORT=$BACKEND_H2_PORT
      return 0 ;;
    bulkhead)
      H2_PORT=$PROXY_PORT   # one listener serves HTTP/1.1 and h2c
      log=$TMP/bulkhead-$n.log
      spawn "$log" env RUST_LOG=warn taskset -c "$PROXY_CPU" \
        "$BULKHEAD_BIN" run --config "$TMP/bulkhead-$n.toml"
      PROXY_PID=$BG_PID MEASURE_PID=$BG_PID ;;
    nginx)
      log=$TMP/nginx-$n/error.log
      nginx_args "$TMP/nginx-$n"
      spawn "$TMP/nginx-$n/stdout.log" taskset -c "$PROXY_CPU" "${NGINX[@]}"
      PROXY_PID=$BG_PID ;;
    haproxy)
      log=$TMP/haproxy-$n/haproxy.log
      spawn "$log" taskset -c "$PROXY_CPU" haproxy -db -f "$TMP/haproxy-$n/haproxy.cfg"
      PROXY_PID=$BG_PID MEASURE_PID=$BG_PID ;;
    l4)
      H2_PORT=$PROXY_PORT   # no h2c listener: it forwards to the backend's HTTP/1.1 port
      log=$TMP/l4/haproxy.log
      spawn "$log" taskset -c "$PROXY_CPU" haproxy -db -f "$TMP/l4/haproxy.cfg"
      PROXY_PID=$BG_PID MEASURE_PID=$BG_PID ;;
  esac
  wait_port "$H1_PORT" "$PROXY_PID" "$name" "$log" || return 1
  wait_port "$H2_PORT" "$PROXY_PID" "$name" "$log" || return 1
  if [[ -n $CPU_CGROUP ]]; then
    # The whole process tree (nginx's worker too), threads included.
    for i in $PROXY_PID $(children "$PROXY_PID"); do echo "$i" >"$CPU_CGROUP/cgroup.procs"; done
  fi
  if [[ $name == nginx ]]; then
    # The master only supervises; the one worker does the work.
    for ((i = 0; i < 50; i++)); do
      MEASURE_PID=$(children "$PROXY_PID" | head -n 1)
      [[ -n $MEASURE_PID ]] && break
      sleep 0.1
    done
    [[ -n $MEASURE_PID ]] || { warn "nginx worker not found"; return 1; }
    PIDS+=("$MEASURE_PID")   # killed on exit should the master die first
  fi
}

stop_proxy() {
  [[ -n $PROXY_PID ]] || return 0
  local worker=$MEASURE_PID
  stop_pid "$PROXY_PID"
  [[ -n $worker && $worker != "$PROXY_PID" ]] && stop_pid "$worker"
  wait_port_closed "$PROXY_PORT"
  wait_port_closed "$PROXY_H2_PORT"
  PROXY_PID="" MEASURE_PID=""
}

# ---- load runs -----------------------------------------------------------------
# Prints "rps p50_ms p99_ms errors" from wrk --latency output.
parse_wrk() {
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
    $1 == "Requests/sec:" { rps = $2 }
    /Non-2xx or 3xx responses:/ { err += $NF }
    /Socket errors:/ { gsub(/,/, ""); err += $4 + $6 + $8 + $10 }
    END {
      if (rps == "") print "- - - 1"
      else printf "%s %.4f %.4f %d\n", rps, p50, p99, err
    }' "$1"
}

# Prints "rps p50_ms p99_ms errors" from h2load output and its --log-file
# (start_us, status, duration_us per request): h2load's summary has no
# percentiles, the per-request log gives true ones.
parse_h2load() { # output logfile
  local rps err pct
  rps=$(awk '/^finished in/ { print $4 }' "$1")
  err=$(awk '
    /^requests:/ { e += $10 + $12 + $14 }
    /^status codes:/ { gsub(/,/, ""); e += $5 + $7 + $9 }
    END { print e + 0 }' "$1")
  pct=$(awk -F'\t' '$2 != -1 { print $3 }' "$2" | sort -n | awk '
    { v[NR] = $1 }
    END {
      if (NR == 0) { print "- -"; exit }
      i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++
      i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++
      printf "%.4f %.4f\n", v[i50] / 1000, v[i99] / 1000
    }')
  [[ -n $rps ]] || { echo "- - - 1"; return; }
  echo "$rps $pct $err"
}

now() { date +%s.%N; }

# load_cmd SCEN PROTO PORT DURATION LOG: fills the array CMD.
CMD=()
load_cmd() {
  local scen=$1 proto=$2 port=$3 dur=$4 log=$5
  local url="http://$ADDR:$port/"
  if [[ $proto == h1 ]]; then
    CMD=(taskset -c "$LOADGEN_CPU" wrk -t1 -c"$CONNS" -d"$dur" --latency
         -H "Host: t1.example.com")
    case $scen in
      b) CMD+=(-s "$HERE/rotate_host.lua" "$url" -- "$HOT_TENANTS") ;;
      # (a) with (b)'s client: the same Lua script rotating over one tenant, so that
      # (b)/(a1) leaves out what the script itself costs the load generator's core.
      a1) CMD+=(-s "$HERE/rotate_host.lua" "$url" -- 1) ;;
      c) CMD+=(-s "$HERE/post_1k.lua" "$url") ;;
      # (a) at one offered load: each connection waits PACE_MS after each response.
      f) CMD=(env PACE_MS="$PACE_MS" "${CMD[@]}" -s "$HERE/pace.lua" "$url") ;;
      # (a) at a fixed rate, RATE a second over the CONNS connections: wrk has no rate
      # of its own, so h2load sends it (--rps per connection; a request whose time comes
      # while the one before is unanswered goes out when that answer arrives), and each
      # request's latency comes from its log.
      g) CMD=(taskset -c "$LOADGEN_CPU" h2load --h1 -t1 -c"$CONNS" --rps="$((RATE / CONNS))"
              -D "$(secs "$dur")" -H ":authority: t1.example.com" --log-file="$log" "$url") ;;
      *) CMD+=("$url") ;;
    esac
  else
    # h2load speaks h2c with prior knowledge to http:// URLs. It cannot rotate
    # :authority (-i ignores the host part of later URIs), so scenario b over
    # h2 sends every request to one tenant out of TENANTS_B.
    local host=t1.example.com
    [[ $scen == b ]] && host=t$HOT_TENANTS.example.com
    CMD=(taskset -c "$LOADGEN_CPU" h2load -t1 -c"$CONNS" -m"$H2_STREAMS" -D "$(secs "$dur")"
         -H ":authority: $host" --log-file="$log")
    [[ $scen == c ]] && CMD+=(-d "$TMP/body-1k")
    CMD+=("$url")
  fi
}

measure() { # scen proto proxy rep
  local scen=$1 proto=$2 proxy=$3 rep=$4 port out h2log t0 t1 c0 c1 b0 b1 g0 g1 cpu=- other res
  port=$H1_PORT; [[ $proto == h2 ]] && port=$H2_PORT
  out=$TMP/runs/$scen-$proto-$proxy-$rep.txt
  h2log=$TMP/runs/$scen-$proto-$proxy-$rep.h2log

  load_cmd "$scen" "$proto" "$port" "$WARMUP" "$h2log"
  run_fg "$out.warmup" "${CMD[@]}" || true

  load_cmd "$scen" "$proto" "$port" "$DURATION" "$h2log"
  c0="" c1=""
  [[ -n $MEASURE_PID ]] && c0=$(cpu_ticks "$MEASURE_PID")
  b0=$(core_busy_ticks "$PROXY_CPU"); g0=$(core_busy_ticks "$LOADGEN_CPU"); t0=$(now)
  run_fg "$out" "${CMD[@]}" || warn "$scen/$proto/$proxy: load generator failed (see $out)"
  b1=$(core_busy_ticks "$PROXY_CPU"); g1=$(core_busy_ticks "$LOADGEN_CPU"); t1=$(now)
  if [[ -n $c0 ]] && proxy_alive; then c1=$(cpu_ticks "$MEASURE_PID"); fi
  if [[ -n $c1 ]]; then
    cpu=$(awk -v c="$((c1 - c0))" -v hz="$CLK_TCK" -v t0="$t0" -v t1="$t1" \
      'BEGIN { printf "%.1f", 100 * c / hz / (t1 - t0) }')
  fi
  # Whatever else ran on the proxy's core meanwhile (a build, say) skews this run.
  other=$(awk -v b="$((b1 - b0))" -v c="$((${c1:-0} - ${c0:-0}))" -v hz="$CLK_TCK" \
    -v t0="$t0" -v t1="$t1" 'BEGIN { x = 100 * (b - c) / hz / (t1 - t0); printf "%.1f", x < 0 ? 0 : x }')
  if [[ $proto == h1 && $scen != g ]]; then res=$(parse_wrk "$out"); else res=$(parse_h2load "$out" "$h2log"); fi
  rm -f "$h2log"
  proxy_alive || { warn "$proxy died during $scen/$proto; see $TMP"; res="- - - 1"; }

  local rps p50 p99 err flag="" loadgen
  read -r rps p50 p99 err <<<"$res"
  # The backend and load generator's core: near 100 %, it (not the proxy) is the limit.
  loadgen=$(awk -v b="$((g1 - g0))" -v hz="$CLK_TCK" -v t0="$t0" -v t1="$t1" \
    'BEGIN { printf "%.0f", 100 * b / hz / (t1 - t0) }')
  if ((err)); then flag="  ERRORS: $err"; fi
  if awk -v o="$other" 'BEGIN { exit !(o >= 5) }'; then
    flag="$flag  NOISY: ${other}% of CPU $PROXY_CPU used by other processes"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
    "$scen" "$proto" "$proxy" "$rep" "$rps" "$p50" "$p99" "$cpu" "$err" "$other" >>"$RAW"
  printf '  %-2s %-2s %-8s rep %d/%d  %10s req/s  p50 %8s ms  p99 %8s ms  cpu %5s%%  CPU %s %3s%%%s\n' \
    "$scen" "$proto" "$proxy" "$rep" "$REPEAT" "$rps" "$p50" "$p99" "$cpu" \
    "$LOADGEN_CPU" "$loadgen" "$flag"
}

# skip_measure SCEN PROTO PROXY: a1 differs from a only in HTTP/1.1's client (h2load
# has no per-request script); f and g are goal 1's HTTP/1.1 tail at one load (the goal sets
# no tail for h2c); l4 forwards to the backend's HTTP/1.1 port only.
skip_measure() { [[ ($1 == a1 || $1 == f || $1 == g || $3 == l4) && $2 == h2 ]]; }

# rotated REP WORD...: the words, rotated left by REP - 1, so that each proxy takes each
# place in the order in turn: a machine that is slower right after one proxy stops, or in
# some part of every repeat, then costs every proxy alike instead of always the same one.
rotated() {
  local k=$(($1 - 1)) i
  shift
  local words=("$@")
  for ((i = 0; i < ${#words[@]}; i++)); do
    printf '%s ' "${words[(i + k) % ${#words[@]}]}"
  done
}

run_load_scenario() { # scen
  local scen=$1 n=1 rep proxy proto
  [[ $scen == b ]] && n=$TENANTS_B
  for ((rep = 1; rep <= REPEAT; rep++)); do
    # shellcheck disable=SC2086 # the proxies' names are single words
    for proxy in $(rotated "$rep" $PROXIES $REFS); do
      if ! start_proxy "$proxy" "$n"; then
        stop_proxy || true
        warn "skipping $proxy for $scen rep $rep"
        continue
      fi
      for proto in $PROTOCOLS; do
        skip_measure "$scen" "$proto" "$proxy" || measure "$scen" "$proto" "$proxy" "$rep"
      done
      stop_proxy
    done
  done
}

# capture_scenario SCEN (a, f or g): one more HTTP/1.1 run per proxy, with CAPTURE_SECS of
# loopback traffic captured from its middle, and residence.py's split of each request's
# time: in the proxy (client -> backend and back), at the backend (which waits for the
# load generator's core it shares), and on the wire in all. The load tool's own p50/p99
# of that run show what the capture costs. Rows are added to $TMP/residence.md.
capture_scenario() {
  local scen=$1 proxy log pcap res rps p50 p99 err wait_s dur
  dur=$(secs "$DURATION")
  wait_s=$(((dur - CAPTURE_SECS) / 2))
  ((wait_s >= 1)) || wait_s=1
  for proxy in $PROXIES; do
    if ! start_proxy "$proxy" cap; then
      stop_proxy || true
      warn "skipping $proxy for the $scen capture"
      continue
    fi
    log=$TMP/runs/cap-$scen-$proxy
    # In memory where there is /dev/shm: writing ~100 MB a second to disk would bring
    # the kernel's writeback onto the proxy's core, and tcpdump would drop packets.
    pcap=$log.pcap
    [[ -d /dev/shm && -w /dev/shm ]] && pcap=/dev/shm/bulkhead-load-cap-$$-$scen-$proxy.pcap
    load_cmd "$scen" h1 "$H1_PORT" "$WARMUP" "$log.h2log"
    run_fg "$log.warmup" "${CMD[@]}" || true
    load_cmd "$scen" h1 "$H1_PORT" "$DURATION" "$log.h2log"
    spawn "$log.txt" "${CMD[@]}"
    local load=$BG_PID
    sleep "$wait_s"
    # On the load generator's core, so that the proxy's core runs nothing else. -Q in:
    # each loopback packet once. 400 bytes hold the heads, x-request-id included.
    spawn "$log.tcpdump" taskset -c "$LOADGEN_CPU" tcpdump -i lo -Q in -s 400 -B 131072 -n \
      -w "$pcap" "tcp and (port $PROXY_PORT or port $BACKEND_PORT)"
    local dump=$BG_PID
    sleep "$CAPTURE_SECS"
    kill -INT "$dump" 2>/dev/null || true
    wait "$dump" 2>/dev/null || true
    forget "$dump"
    wait "$load" || warn "$scen/$proxy capture: load generator failed (see $log.txt)"
    forget "$load"
    stop_proxy
    if [[ $scen == g ]]; then res=$(parse_h2load "$log.txt" "$log.h2log"); else res=$(parse_wrk "$log.txt"); fi
    read -r rps p50 p99 err <<<"$res"
    if [[ ! -s $pcap ]]; then
      warn "$scen/$proxy: tcpdump captured nothing (it needs root or CAP_NET_RAW); see $log.tcpdump"
      continue
    fi
    # h2load's per-request log (g): its own latencies over the capture, beside the wire's.
    local files=$pcap
    [[ $scen == g ]] && files="$pcap,$log.h2log"
    if python3 "$HERE/residence.py" "$PROXY_PORT" "$BACKEND_PORT" \
      "$scen: $proxy ($p50 / $p99 ms)=$files" >"$log.residence"; then
      tail -n +3 "$log.residence" | tee -a "$TMP/residence.md"
    else
      warn "$scen/$proxy: residence.py could not read the capture (see $log.residence)"
    fi
    if ((KEEP_TMP)); then
      [[ $pcap == "$log.pcap" ]] || mv "$pcap" "$log.pcap"
    else
      rm -f "$pcap"
    fi
  done
}

run_paired_repeat() { # rep: each proxy and protocol in turn, its scenarios back to back
  local rep=$1 proxy proto scen n
  # shellcheck disable=SC2086 # the proxies' names are single words
  for proxy in $(rotated "$rep" $PROXIES $REFS); do
    for proto in $PROTOCOLS; do
      for scen in $SCENARIOS; do
        [[ $scen == d ]] && continue
        skip_measure "$scen" "$proto" "$proxy" && continue
        n=1
        [[ $scen == b ]] && n=$TENANTS_B
        if ! start_proxy "$proxy" "$n"; then
          stop_proxy || true
          warn "skipping $proxy for $scen rep $rep"
          continue
        fi
        measure "$scen" "$proto" "$proxy" "$rep"
        stop_proxy
      done
    done
  done
}

run_idle_scenario() {
  local rep proxy before after out py line opened failed alive i
  for ((rep = 1; rep <= REPEAT; rep++)); do
    for proxy in $PROXIES; do
      if ! start_proxy "$proxy" 1; then
        stop_proxy || true
        warn "skipping $proxy for d rep $rep"
        continue
      fi
      # A little traffic first so one-time allocations are not counted per connection.
      run_fg "$TMP/runs/d-$proxy-$rep.warmup" taskset -c "$LOADGEN_CPU" \
        wrk -t1 -c4 -d1s -H "Host: t1.example.com" "http://$ADDR:$H1_PORT/" || true
      sleep 1
      before=$(rss_kib "$MEASURE_PID")
      out=$TMP/runs/d-$proxy-$rep.txt
      spawn "$out" taskset -c "$LOADGEN_CPU" python3 "$HERE/idle_conns.py" \
        --addr "$ADDR" --port "$H1_PORT" --authority t1.example.com -n "$IDLE_CONNS"
      py=$BG_PID
      line=""
      for ((i = 0; i < 1800; i++)); do
        line=$(grep -m1 '^ready ' "$out" || true)
        [[ -n $line ]] && break
        kill -0 "$py" 2>/dev/null || break
        sleep 0.1
      done
      if [[ -z $line ]]; then
        warn "idle_conns.py did not get ready against $proxy:"; cat "$out" >&2
        stop_pid "$py"; stop_proxy; continue
      fi
      sleep 1
      after=$(rss_kib "$MEASURE_PID")
      kill -USR1 "$py" 2>/dev/null || true
      wait "$py" || true
      forget "$py"
      if [[ -z $before || -z $after ]]; then
        warn "$proxy died during scenario d rep $rep; see $TMP"
        stop_proxy; continue
      fi
      read -r _ opened failed <<<"$line"
      alive=$(awk '/^alive / { print $2 }' "$out"); alive=${alive:--}
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$proxy" "$rep" "$before" "$after" "$opened" "$failed" "$alive" >>"$IDLE"
      printf '  d  h1 %-8s rep %d/%d  RSS %s -> %s KiB  %s conns held (%s failed, %s still idle)  %s KiB/conn\n' \
        "$proxy" "$rep" "$REPEAT" "$before" "$after" "$opened" "$failed" "$alive" \
        "$(awk -v a="$after" -v b="$before" -v n="$opened" \
          'BEGIN { if (n > 0) printf "%.2f", (a - b) / n; else print "-" }')"
      stop_proxy
    done
  done
}

# Other work on the machine (a compiler, say) skews every figure: say so up front.
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
    warn "$BUSY_NOTE (see top); consider waiting for it to finish"
  fi
}

# ---- report --------------------------------------------------------------------
the_command() {
  printf 'DURATION=%s WARMUP=%s CONNS=%s H2_STREAMS=%s REPEAT=%s SCENARIOS="%s" PROXIES="%s" ' \
    "$DURATION" "$WARMUP" "$CONNS" "$H2_STREAMS" "$REPEAT" "$SCENARIOS" "$PROXIES"
  printf 'PROTOCOLS="%s" TENANTS_B=%s HOT_TENANTS=%s IDLE_CONNS=%s ' \
    "$PROTOCOLS" "$TENANTS_B" "$HOT_TENANTS" "$IDLE_CONNS"
  if ((PAIRED)); then printf 'PAIRED=1 '; fi
  if [[ " $SCENARIOS " == *" f "* ]]; then printf 'PACE_MS=%s ' "$PACE_MS"; fi
  if [[ " $SCENARIOS " == *" g "* ]]; then printf 'RATE=%s ' "$RATE"; fi
  if ((!L4)); then printf 'L4=0 '; fi
  if [[ -n $PROXY_CPU_QUOTA ]]; then printf 'PROXY_CPU_QUOTA=%s ' "$PROXY_CPU_QUOTA"; fi
  if ((CAPTURE)); then printf 'CAPTURE=1 CAPTURE_SECS=%s ' "$CAPTURE_SECS"; fi
  if ((SAME_HEADERS)); then printf 'SAME_HEADERS=1 '; fi
  printf 'benches/load/run.sh'
}

# PROXY_CPU_QUOTA: a cgroup whose CPU quota is that share of one core (cgroup v2's
# cpu.max, or v1's cpu controller); sets CPU_CGROUP. Needs root.
CPU_CGROUP=""
make_cpu_cgroup() {
  [[ -n $PROXY_CPU_QUOTA ]] || return 0
  [[ $PROXY_CPU_QUOTA =~ ^[0-9]+$ ]] && ((PROXY_CPU_QUOTA >= 5 && PROXY_CPU_QUOTA <= 100)) ||
    die "PROXY_CPU_QUOTA must be a percentage from 5 to 100, not $PROXY_CPU_QUOTA"
  local quota=$((PROXY_CPU_QUOTA * 100)) name=bulkhead-load-$$
  if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
    grep -qw cpu /sys/fs/cgroup/cgroup.controllers || die "cgroup v2 without the cpu controller"
    echo +cpu >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
    CPU_CGROUP=/sys/fs/cgroup/$name
    mkdir "$CPU_CGROUP" || die "cannot create $CPU_CGROUP (PROXY_CPU_QUOTA needs root)"
    echo "$quota 10000" >"$CPU_CGROUP/cpu.max"
  elif [[ -d /sys/fs/cgroup/cpu ]]; then
    CPU_CGROUP=/sys/fs/cgroup/cpu/$name
    mkdir "$CPU_CGROUP" || die "cannot create $CPU_CGROUP (PROXY_CPU_QUOTA needs root)"
    echo 10000 >"$CPU_CGROUP/cpu.cfs_period_us"
    echo "$quota" >"$CPU_CGROUP/cpu.cfs_quota_us"
  else
    die "PROXY_CPU_QUOTA needs a cgroup cpu controller under /sys/fs/cgroup"
  fi
}

remove_cpu_cgroup() {
  [[ -n $CPU_CGROUP && -d $CPU_CGROUP ]] || return 0
  local p
  # Whatever is still in it (nothing, once the proxies are stopped) goes back to the root.
  for p in $(cat "$CPU_CGROUP/cgroup.procs" 2>/dev/null); do
    echo "$p" >"$(dirname "$CPU_CGROUP")/cgroup.procs" 2>/dev/null || true
  done
  rmdir "$CPU_CGROUP" 2>/dev/null || true
}

versions() {
  local commit dirty
  commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "no commit yet")
  dirty=$(git -C "$REPO" status --porcelain 2>/dev/null | wc -l)
  echo "- repository: $commit ($dirty uncommitted paths)"
  [[ " $PROXIES " == *" bulkhead "* ]] &&
    echo "- bulkhead: $("$BULKHEAD_BIN" --version 2>&1 | head -n 1) ($BULKHEAD_BIN)"
  echo "- nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //')"
  [[ " $PROXIES " == *" haproxy "* ]] && echo "- haproxy: $(haproxy -v 2>&1 | head -n 1)"
  echo "- wrk: $(wrk -v 2>&1 | head -n 1 | awk '{print $1, $2}')"
  [[ " $PROTOCOLS " == *" h2 "* ]] && echo "- h2load: $(h2load --version 2>&1 | head -n 1)"
  echo "- machine: $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)," \
    "$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r)"
  return 0
}

write_markdown() {
  {
    echo "# Bulkhead load benchmark — $(date -u +'%Y-%m-%d %H:%M UTC')"
    echo
    echo '```'
    the_command; echo
    echo '```'
    echo
    versions
    echo "- pinning: backend nginx and the load generator on CPU $LOADGEN_CPU;" \
      "the proxy under test on CPU $PROXY_CPU, one worker"
    [[ -n $BUSY_NOTE ]] && echo "- **warning: $BUSY_NOTE**"
    echo "- load: wrk -t1 -c$CONNS (HTTP/1.1); h2load -t1 -c$CONNS -m$H2_STREAMS (h2c, prior" \
      "knowledge); $DURATION per run after a $WARMUP warm-up; medians of $REPEAT interleaved repeats"
    echo
    python3 "$HERE/report.py" md "$RAW" "$IDLE"
    echo
    cat <<'EOF'
Columns: req/s, p50 and p99 are medians over the repeats (each column on its own).
HTTP/1.1 latencies are wrk's `--latency` percentiles; h2c latencies are computed from
h2load's per-request `--log-file` (time from request start to end of response).
"proxy CPU%" is the proxy process's CPU time over the run; below ~95 % the proxy was not
the bottleneck (the shared backend/load-generator core was), and req/CPU-s — requests per
second of proxy CPU — is then the fairer efficiency comparison. B/peer = Bulkhead ÷ that
row (req/s: higher is better for Bulkhead; p99: lower is better). For the direct row the
req/s ratio is the fraction of the ceiling Bulkhead reaches. The direct h2c row is only a
reference: there the backend, on the load generator's core, does the h2 framing that the
proxies do on their own core (they speak HTTP/1.1 to it), so a proxy can beat it.
The l4 row (HTTP/1.1 only) is HAProxy in mode tcp: each client connection spliced to a
backend connection, the same system calls as a proxy and no HTTP work, so about the most
any proxy reaches on this layout.
Scenario b over h2c sends all requests to one of the configured tenants: h2load cannot
rotate `:authority`. "errors" counts
non-2xx responses and socket errors; a row with errors is not a valid figure. "other CPU%"
is the most CPU time any repeat of that row saw other processes take on the proxy's core;
above a few per cent the figure is skewed.
EOF
    if [[ -s $TMP/residence.md ]]; then
      echo
      echo "Where the time goes (\`CAPTURE=1\`): one more run per proxy and scenario, with"
      echo "$CAPTURE_SECS s of loopback traffic captured from its middle (tcpdump on CPU $LOADGEN_CPU) and"
      echo "each exchange's four packets tied together by its \`x-request-id\` (benches/load/residence.py)."
      echo "In µs. *proxy in*: client's request to the proxy's request to the backend; *proxy out*: the"
      echo "backend's response to the proxy's response; *backend*: the backend's answer, waiting for the"
      echo "core it shares with the load generator included; *wire*: the client's request to its"
      echo "response; *h2load* (g only, from its per-request log): its latencies for the requests"
      echo "it started within the capture, and by how much they exceed the wire's at p50 and p99 —"
      echo "the time h2load itself took to send what it had timed and to read what had arrived, on"
      echo "the core it shares with the backend. The load tool's own p50 / p99 for the whole run are"
      echo "beside each name: the capture adds work to both cores, so compare these rows with each"
      echo "other, not with the table above."
      echo
      echo "| run | exchanges | proxy in p50/p99 | proxy out p50/p99 | proxy total p50/p90/p99 | backend p50/p99 | wire p50/p90/p99 | h2load p50/p90/p99 | h2load over wire p50/p99 |"
      echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
      cat "$TMP/residence.md"
    fi
    echo
    echo "<details><summary>raw runs</summary>"
    echo
    echo '```'
    printf 'scenario\tproto\tproxy\trep\treq/s\tp50_ms\tp99_ms\tcpu%%\terrors\tother_cpu%%\n'
    cat "$RAW"
    [[ -s $IDLE ]] && printf '\nproxy\trep\trss_before_kib\trss_after_kib\topened\tfailed\tstill_idle\n' &&
      cat "$IDLE"
    echo '```'
    echo
    echo "</details>"
  } >"$OUT"
}

# ---- main ----------------------------------------------------------------------
main() {
  check_knobs
  check_tools
  if [[ $BULKHEAD_BIN != /* ]]; then BULKHEAD_BIN=$PWD/$BULKHEAD_BIN; fi

  # 10,000 idle connections need 10,000+ descriptors in the proxy and the client.
  local hard
  hard=$(ulimit -Hn)
  [[ $hard == unlimited ]] && hard=1048576
  NOFILE=$((hard < 65536 ? hard : 65536))
  ulimit -Sn "$NOFILE"
  if [[ " $SCENARIOS " == *" d "* ]] && ((NOFILE < IDLE_CONNS + 1000)); then
    die "open-file limit $NOFILE is too low for IDLE_CONNS=$IDLE_CONNS; raise the hard limit" \
      "(ulimit -Hn, or docker --ulimit nofile=65536) or lower IDLE_CONNS"
  fi
  CLK_TCK=$(getconf CLK_TCK)
  # Reference rows after the proxies: the backend direct (the ceiling), and the l4
  # forwarder when HTTP/1.1 is measured (it needs HAProxy; only a reference, so its
  # absence does not stop the run).
  REFS=direct
  if ((L4)) && [[ " $PROTOCOLS " == *" h1 "* ]]; then
    if command -v haproxy >/dev/null; then REFS="direct l4"
    else warn "no haproxy: the l4 reference row is left out (apt-get install -y haproxy)"; fi
  fi
  export TENANTS_B HOT_TENANTS IDLE_CONNS PAIRED PACE_MS RATE   # report.py labels scenarios with them, reads PAIRED
  busy_check

  local p
  for p in $PROXY_PORT $ADMIN_PORT $PROXY_H2_PORT $BACKEND_PORT $BACKEND_H2_PORT; do
    port_open "$p" && die "$ADDR:$p is already in use; stop whatever listens there first"
  done

  TMP=$(mktemp -d /tmp/bulkhead-load.XXXXXX)
  chmod 755 "$TMP"   # nginx workers run as an unprivileged user when started as root
  mkdir -p "$TMP/runs"
  RAW=$TMP/raw.tsv IDLE=$TMP/idle.tsv
  : >"$RAW"; : >"$IDLE"; : >"$TMP/residence.md"

  write_configs
  validate_configs
  make_cpu_cgroup
  say "configs in $TMP; backend on $ADDR:$BACKEND_PORT (h2c $BACKEND_H2_PORT), CPU $LOADGEN_CPU;" \
    "proxies on $ADDR:$PROXY_PORT (nginx/HAProxy h2c $PROXY_H2_PORT), CPU $PROXY_CPU"
  start_backend

  local scen rep
  if ((PAIRED)); then
    # The machine's speed changes over tens of seconds: measured back to back, one
    # proxy's scenarios in one repeat share it, and their ratio cancels it.
    for ((rep = 1; rep <= REPEAT; rep++)); do
      say "repeat $rep of scenarios $SCENARIOS"
      run_paired_repeat "$rep"
    done
    if [[ " $SCENARIOS " == *" d "* ]]; then say "scenario d"; run_idle_scenario; fi
  else
    for scen in $SCENARIOS; do
      say "scenario $scen"
      if [[ $scen == d ]]; then run_idle_scenario; else run_load_scenario "$scen"; fi
    done
  fi

  if ((CAPTURE)); then
    for scen in a f g; do
      [[ " $SCENARIOS " == *" $scen "* ]] || continue
      say "capture of scenario $scen (residence.py): proxy in / out p50/p99, proxy total p50/p90/p99, backend p50/p99, wire p50/p90/p99, h2load p50/p90/p99 and its excess over the wire p50/p99, in µs"
      capture_scenario "$scen"
    done
  fi

  say ""
  python3 "$HERE/report.py" text "$RAW" "$IDLE"
  write_markdown
  say ""
  say "command: $(the_command)"
  say "markdown report: $OUT"
}

trap 'rc=$?; remove_cpu_cgroup; rm -f /dev/shm/bulkhead-load-cap-$$-*; (exit $rc); cleanup' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
main "$@"
