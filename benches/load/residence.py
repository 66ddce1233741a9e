#!/usr/bin/env python3
"""Where a request's time goes, from a packet capture of the loopback interface.

    residence.py PROXY_PORT BACKEND_PORT NAME=FILE.pcap[,H2LOAD.log]...

Each capture (tcpdump -i lo -Q in, see run.sh's CAPTURE) holds the four legs of every
HTTP/1.1 exchange: client -> proxy (t1), proxy -> backend (t2), backend -> proxy (t3),
proxy -> client (t4). Each connection carries one exchange at a time, so a leg is
paired with the one before it on the same connection; the client's exchange is tied
to the backend's by the `x-request-id` the proxy sends both ways. Prints one markdown
row per capture: the proxy's own time (t2 - t1 in, t4 - t3 out, and their sum), the
backend's (t3 - t2, which includes waiting for the load generator's shared core), and
the whole exchange as seen on the wire (t4 - t1), as p50 / p90 / p99 in microseconds.

With h2load's per-request log (--log-file: start in µs since the epoch, status,
duration) beside a capture, the row also gives h2load's own latencies for the requests it
started within the capture, and how far they exceed the wire's at p50 and p99: the time
h2load itself took on either side of the wire (to send a request it had timed, and to
read a response that had arrived), as a difference of distributions — the log does not
say which connection a request went on, so requests are not paired one by one.
"""

import re
import struct
import sys

REQUEST_ID = re.compile(rb"\r\nx-request-id: *([^\r\n]+)", re.IGNORECASE)
METHODS = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ")


def packets(path):
    """(time, src port, dst port, TCP payload) for each IPv4 TCP packet with data."""
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24:
            return
        magic = struct.unpack("<I", head[:4])[0]
        if magic in (0xA1B2C3D4, 0xA1B23C4D):
            endian = "<"
        elif magic in (0xD4C3B2A1, 0x4D3CB2A1):
            endian = ">"
        else:
            raise SystemExit(f"{path}: not a pcap file")
        nano = magic in (0xA1B23C4D, 0x4D3CB2A1)
        link = struct.unpack(endian + "I", head[20:24])[0]
        skip = {1: 14, 113: 16, 0: 4, 101: 0}.get(link)
        if skip is None:
            raise SystemExit(f"{path}: link type {link} not handled")
        while True:
            rec = f.read(16)
            if len(rec) < 16:
                return
            sec, frac, incl, _ = struct.unpack(endian + "IIII", rec)
            data = f.read(incl)
            ip = data[skip:]
            if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
                continue
            tcp = ip[(ip[0] & 15) * 4 :]
            if len(tcp) < 20:
                continue
            sport, dport = struct.unpack(">HH", tcp[:4])
            payload = tcp[(tcp[12] >> 4) * 4 :]
            if payload:
                yield sec + frac * (1e-9 if nano else 1e-6), sport, dport, payload


def legs(path, proxy_port, backend_port):
    """[(in, backend, out, wire)] in seconds, one per exchange seen whole; how many
    client exchanges were seen; and the times of every client request (t1) and of
    every response to a client (t4)."""
    client_sent = {}  # client port -> t1 of the request awaiting its response
    upstream_sent = {}  # proxy's upstream port -> (t2, request id)
    backend_done = {}  # request id -> (t2, t3)
    client_done = {}  # request id -> (t1, t4)
    sends, answers = [], []
    for t, sport, dport, payload in packets(path):
        if dport == proxy_port:
            if payload.startswith(METHODS):
                client_sent.setdefault(sport, t)
                sends.append(t)
        elif dport == backend_port:
            if payload.startswith(METHODS):
                m = REQUEST_ID.search(payload)
                upstream_sent[sport] = (t, m.group(1) if m else None)
        elif sport == backend_port:
            if payload.startswith(b"HTTP/1."):
                sent = upstream_sent.pop(dport, None)
                if sent and sent[1]:
                    backend_done[sent[1]] = (sent[0], t)
        elif sport == proxy_port:
            if payload.startswith(b"HTTP/1."):
                answers.append(t)
                t1 = client_sent.pop(dport, None)
                m = REQUEST_ID.search(payload)
                if t1 is not None and m:
                    client_done[m.group(1)] = (t1, t)
    out = []
    for rid, (t1, t4) in client_done.items():
        up = backend_done.get(rid)
        if up:
            t2, t3 = up
            if t1 <= t2 <= t3 <= t4:
                out.append((t2 - t1, t3 - t2, t4 - t3, t4 - t1))
    return out, len(client_done), sends, answers


def h2load_latencies(h2log, lo, hi):
    """h2load's latencies, in seconds, of the requests it started between lo and hi."""
    out = []
    with open(h2log) as f:
        for line in f:
            fields = line.split()
            if len(fields) < 3 or fields[1] == "-1":
                continue
            if lo <= int(fields[0]) / 1e6 <= hi:
                out.append(int(fields[2]) / 1e6)
    return out


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1e6


def main(argv):
    if len(argv) < 4:
        raise SystemExit(__doc__)
    proxy_port, backend_port = int(argv[1]), int(argv[2])
    print(
        "| proxy | exchanges | proxy in p50/p99 | proxy out p50/p99 "
        "| proxy total p50/p90/p99 | backend p50/p99 | wire total p50/p90/p99 "
        "| h2load p50/p90/p99 | h2load over wire p50/p99 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arg in argv[3:]:
        name, _, files = arg.partition("=")
        path, _, h2log = files.partition(",")
        rows, seen, sends, answers = legs(path, proxy_port, backend_port)
        if not rows:
            print(f"| {name} | 0 of {seen} | - | - | - | - | - | - | - |")
            continue
        client = ("-", "-")
        if h2log and sends:
            # Requests that started once the capture had begun, and whose response
            # came within it (with the wire's longest to spare).
            lo, hi = sends[0], answers[-1] - max(r[3] for r in rows)
            lat = h2load_latencies(h2log, lo, hi)
            if lat:
                wire = [r[3] for r in rows]
                client = (
                    f"{pct(lat, .5):.0f} / {pct(lat, .9):.0f} / {pct(lat, .99):.0f}",
                    f"{pct(lat, .5) - pct(wire, .5):.0f} / {pct(lat, .99) - pct(wire, .99):.0f}",
                )
        col = lambda i: [r[i] for r in rows]  # noqa: E731
        total = [r[0] + r[2] for r in rows]
        two = lambda v: f"{pct(v, .5):.0f} / {pct(v, .99):.0f}"  # noqa: E731
        three = lambda v: f"{pct(v, .5):.0f} / {pct(v, .9):.0f} / {pct(v, .99):.0f}"  # noqa: E731
        print(
            f"| {name} | {len(rows):,} | {two(col(0))} | {two(col(2))} | {three(total)} "
            f"| {two(col(1))} | {three(col(3))} | {client[0]} | {client[1]} |"
        )


if __name__ == "__main__":
    main(sys.argv)
