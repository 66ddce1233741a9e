# Sourced by ab.sh, reload.sh, tls.sh and instructions.sh: the benchmark backend (nginx
# `return 200`, 13 bytes, one worker) on 127.0.0.1:19000 (plus BACKEND_OFFSET, which
# instructions.sh sets from its PORT_OFFSET), pinned to CPU 0. Needs $TMP, and appends
# nginx's pid to the caller's PIDS array so its cleanup stops it.
start_backend() {
  cat >"$TMP/backend.conf" <<CONF
daemon off;
worker_processes 1;
pid $TMP/nginx.pid;
error_log $TMP/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 100000000;
    server { listen 127.0.0.1:$((19000 + ${BACKEND_OFFSET:-0})); location / { return 200 "hello, world\n"; } }
}
CONF
  taskset -c 0 nginx -c "$TMP/backend.conf" -p "$TMP" & PIDS+=($!)
  sleep 0.5
}
