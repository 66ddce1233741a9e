#!/usr/bin/env python3
"""Hold N idle HTTP/1.1 keep-alive connections open against a proxy (scenario d).

Opens N connections to ADDR:PORT, sends one GET on each and reads the whole
response, then leaves every connection open and idle. When all are open it
prints one line

    ready OK FAILED

and waits. On SIGUSR1 it checks which connections the server has closed or
written to in the meantime, prints

    alive ALIVE

closes everything with RST (SO_LINGER 0, so no TIME_WAIT eats the ephemeral
port range between repeats) and exits 0. SIGTERM/SIGINT or --hold seconds
without a signal close everything and exit 1.

run.sh reads the proxy's VmRSS before starting this script and again after
"ready"; the difference divided by OK is the memory per idle connection.

Standard library only. Loopback only: the address must be 127.0.0.1.
"""

import argparse
import resource
import selectors
import signal
import socket
import struct
import sys

LINGER_RST = struct.pack("ii", 1, 0)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--authority", default="t1.example.com", help="Host header")
    p.add_argument("-n", "--conns", type=int, default=10000)
    p.add_argument("--batch", type=int, default=200,
                   help="connections opened (and requests in flight) at once")
    p.add_argument("--hold", type=float, default=600,
                   help="give up after this many seconds without SIGUSR1")
    p.add_argument("--timeout", type=float, default=10, help="per-socket I/O timeout")
    args = p.parse_args()
    if args.addr != "127.0.0.1":
        p.error("this benchmark only talks to 127.0.0.1")
    return args


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need + 64
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    if soft < want:
        print(f"warning: RLIMIT_NOFILE {soft} < {want}; some connections will fail",
              file=sys.stderr)


def read_response(sock):
    """Read one HTTP/1.1 response; return its status code (keeps the socket usable)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before response head")
        buf += chunk
        if len(buf) > 1 << 20:
            raise ConnectionError("response head too large")
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while not body.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside chunked body")
            body += chunk
    elif length is not None:
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside body")
            body += chunk
    else:
        raise ConnectionError("response without length cannot be kept alive")
    return status


def close_all(socks):
    for s in socks:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        except OSError:
            pass
        s.close()


def still_idle(socks):
    """Connections the server has neither closed nor written to since the response."""
    sel = selectors.DefaultSelector()  # epoll: select() cannot watch 10,000 fds
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    touched = len(sel.select(timeout=0))
    sel.close()
    return len(socks) - touched


def main():
    args = parse_args()
    raise_nofile(args.conns)
    # Block the signals we wait for, so one arriving early is queued, not lost.
    waited = {signal.SIGUSR1, signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, waited)

    request = (f"GET / HTTP/1.1\r\nHost: {args.authority}\r\n"
               f"User-Agent: bulkhead-idle-conns\r\n\r\n").encode()
    kept, failed = [], 0
    first_error = None
    remaining = args.conns
    while remaining > 0 and failed <= max(100, args.conns // 100):
        batch = []
        for _ in range(min(args.batch, remaining)):
            remaining -= 1
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(args.timeout)
            try:
                s.connect((args.addr, args.port))
                s.sendall(request)
                batch.append(s)
            except OSError as e:
                first_error = first_error or repr(e)
                failed += 1
                s.close()
        for s in batch:
            try:
                status = read_response(s)
                if status != 200:
                    raise ConnectionError(f"status {status}")
                kept.append(s)
            except (OSError, ValueError, IndexError) as e:
                first_error = first_error or repr(e)
                failed += 1
                close_all([s])
    failed += remaining  # not attempted after too many failures
    if first_error:
        print(f"first error: {first_error}", file=sys.stderr)
    print(f"ready {len(kept)} {failed}", flush=True)

    info = signal.sigtimedwait(waited, args.hold)
    if info is not None and info.si_signo == signal.SIGUSR1:
        print(f"alive {still_idle(kept)}", flush=True)
        close_all(kept)
        return 0
    close_all(kept)
    return 1


if __name__ == "__main__":
    sys.exit(main())
