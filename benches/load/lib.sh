#!/usr/bin/env bash
# Helpers shared by run.sh and tls.sh: messages, durations, background processes
# remembered for cleanup, ports, CPU accounting. Sourced; the caller sets ADDR (the
# loopback address) and KEEP_TMP, and installs `trap cleanup EXIT INT TERM`.

PIDS=()
TMP=""

say() { printf '%s\n' "$*"; }

warn() { printf 'warning: %s\n' "$*" >&2; }

die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# "10s" / "2m" / "10" -> whole seconds (h2load -D takes the same forms; wrk too).
secs() {
  case $1 in
    *[0-9]s) echo "${1%s}" ;;
    *[0-9]m) echo $((${1%m} * 60)) ;;
    *[0-9]) echo "$1" ;;
    *) die "cannot parse duration '$1' (use e.g. 10s, 2m)" ;;
  esac
}

forget() { # pid: drop from the kill list
  local keep=() p
  for p in ${PIDS[@]+"${PIDS[@]}"}; do [[ $p == "$1" ]] || keep+=("$p"); done
  PIDS=(${keep[@]+"${keep[@]}"})
}

stop_pid() { # pid: SIGTERM, up to 10 s, then SIGKILL
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    # A zombie child counts as gone; `wait` below reaps it.
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]] && break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  forget "$pid"
}

cleanup() {
  local rc=$? p
  trap - EXIT INT TERM
  set +e
  for p in ${PIDS[@]+"${PIDS[@]}"}; do kill -TERM "$p" 2>/dev/null; done
  for p in ${PIDS[@]+"${PIDS[@]}"}; do stop_pid "$p"; done
  if [[ -n $TMP && -d $TMP ]]; then
    if [[ $KEEP_TMP == 1 || $rc -ne 0 ]]; then
      say "configs, logs and raw tool output kept in $TMP" >&2
    else
      rm -rf "$TMP"
    fi
  fi
  exit "$rc"
}

# Run a command in the background, remembered for cleanup; sets BG_PID.
spawn() { # log cmd...
  local log=$1; shift
  "$@" >"$log" 2>&1 &
  BG_PID=$!
  PIDS+=("$BG_PID")
}

# Run a command to completion, interruptibly (a trapped signal ends `wait`).
run_fg() { # log cmd...
  local rc=0
  spawn "$@"
  wait "$BG_PID" || rc=$?
  forget "$BG_PID"
  return "$rc"
}

port_open() { (exec 3<>"/dev/tcp/$ADDR/$1") 2>/dev/null; }

wait_port() { # port pid name log
  local i
  for ((i = 0; i < 600; i++)); do
    port_open "$1" && return 0
    if ! kill -0 "$2" 2>/dev/null; then
      warn "$3 exited before listening on $ADDR:$1; last lines of $4:"
      tail -n 20 "$4" >&2
      return 1
    fi
    sleep 0.1
  done
  warn "$3 did not listen on $ADDR:$1 within 60 s; last lines of $4:"
  tail -n 20 "$4" >&2
  return 1
}

wait_port_closed() { # port
  local i
  for ((i = 0; i < 100; i++)); do port_open "$1" || return 0; sleep 0.1; done
  die "$ADDR:$1 still accepts connections after the proxy stopped"
}

# Busy (not idle, not iowait) clock ticks of one CPU since boot, from /proc/stat.
core_busy_ticks() { awk -v c="cpu$1" '$1 == c { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }

# utime + stime of every thread of the process, in clock ticks.
cpu_ticks() { { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null || true; } | awk '{print $12 + $13}'; }

proxy_alive() { [[ -z $PROXY_PID ]] || kill -0 "$PROXY_PID" 2>/dev/null; }
