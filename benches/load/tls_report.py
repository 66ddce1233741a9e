#!/usr/bin/env python3
"""Turn tls.sh's raw per-run rows into tables of medians (text or markdown).

    tls_report.py text|md RAW_TSV PROBE_TSV

RAW_TSV columns (one row per measured run):
    scenario proxy rep rps p50_ms p99_ms cpu_pct errors other_cpu_pct requests
    handshakes resumed
PROBE_TSV columns (one row per proxy, from openssl s_client):
    proxy protocol suite key_exchange signature subject alpn verify status resumed

Every figure is the median over the repeats of that cell, each column taken on its
own. Standard library only.
"""

import statistics
import sys

SCENARIOS = {
    "full": "new connection per request, full handshake",
    "resume": "new connection per request, resumed",
    "h1": "keep-alive, HTTP/1.1",
    "h2": "keep-alive, h2 by ALPN",
}
PROXY_ORDER = ["bulkhead", "nginx", "haproxy"]
PEER_LABEL = {"nginx": "nginx", "haproxy": "HAProxy"}


def fnum(x):
    try:
        return float(x)
    except ValueError:
        return None


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def read_tsv(path):
    try:
        with open(path) as f:
            return [line.rstrip("\n").split("\t") for line in f if line.strip()]
    except FileNotFoundError:
        return []


def cells(raw):
    """(scenario, proxy) -> dict of medians."""
    runs = {}
    for r in raw:
        if len(r) < 12:
            continue
        runs.setdefault((r[0], r[1]), []).append(r)
    out = {}
    for key, rs in runs.items():
        rps = [fnum(r[3]) for r in rs]
        cpu = [fnum(r[6]) for r in rs]
        per_cpu = [
            rp / (c / 100) if rp is not None and c else None for rp, c in zip(rps, cpu)
        ]
        conns = [ratio(fnum(r[10]), fnum(r[9])) for r in rs]
        resumed = [ratio(fnum(r[11]), fnum(r[10])) for r in rs]
        out[key] = {
            "rps": median(rps),
            "p50": median([fnum(r[4]) for r in rs]),
            "p99": median([fnum(r[5]) for r in rs]),
            "cpu": median(cpu),
            "per_cpu": median(per_cpu),
            "conns": median(conns),
            "resumed": median(resumed),
            "errors": sum(int(fnum(r[7]) or 0) for r in rs),
            "other": max((fnum(r[8]) or 0) for r in rs),
            "n": len(rs),
        }
    return out


def rows(raw):
    c = cells(raw)
    scens = [s for s in SCENARIOS if any(k[0] == s for k in c)]
    table = []
    for s in scens:
        b = c.get((s, "bulkhead"))
        for p in PROXY_ORDER:
            m = c.get((s, p))
            if not m:
                continue
            peer = p != "bulkhead" and b is not None
            table.append([
                f"{s}: {SCENARIOS[s]}",
                p,
                fmt(m["rps"], ",.0f"),
                fmt(m["p50"], ".2f"),
                fmt(m["p99"], ".2f"),
                fmt(m["cpu"], ".0f"),
                fmt(m["per_cpu"], ",.0f"),
                fmt(m["conns"], ".3f"),
                fmt(None if m["resumed"] is None else 100 * m["resumed"], ".0f"),
                fmt(ratio(b["rps"], m["rps"]), ".2f") if peer else "-",
                fmt(ratio(b["p99"], m["p99"]), ".2f") if peer else "-",
                fmt(ratio(b["per_cpu"], m["per_cpu"]), ".2f") if peer else "-",
                str(m["errors"]) if m["errors"] else "",
                fmt(m["other"], ".0f"),
            ])
    return table


HEAD = ["scenario", "proxy", "req/s", "p50 ms", "p99 ms", "proxy CPU%", "req/CPU-s",
        "conns/req", "resumed %", "B/peer req/s", "B/peer p99", "B/peer req/CPU-s",
        "errors", "other CPU%"]


def ratio_rows(raw):
    """One line per scenario: Bulkhead's req/s and req/CPU-s over each peer's."""
    c = cells(raw)
    out = []
    for s in SCENARIOS:
        b = c.get((s, "bulkhead"))
        if not b:
            continue
        line = [SCENARIOS[s], fmt(b["rps"], ",.0f")]
        for p in ("nginx", "haproxy"):
            m = c.get((s, p))
            line.append(fmt(ratio(b["rps"], m["rps"]), ".2f") if m else "-")
        for p in ("nginx", "haproxy"):
            m = c.get((s, p))
            line.append(fmt(ratio(b["per_cpu"], m["per_cpu"]), ".2f") if m else "-")
        out.append(line)
    return out


RATIO_HEAD = ["scenario", "Bulkhead req/s", "÷ nginx", "÷ HAProxy",
              "req/CPU-s ÷ nginx", "req/CPU-s ÷ HAProxy"]

PROBE_HEAD = ["proxy", "protocol", "suite", "key exchange", "signature", "certificate",
              "ALPN (h2,http/1.1 offered)", "chain verifies", "GET", "resumes a saved session"]


def md_table(head, body, right_from):
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i < right_from else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def text_table(head, body):
    w = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    out = ["  ".join(str(x).ljust(n) for x, n in zip(head, w))]
    out += ["  ".join(str(x).ljust(n) for x, n in zip(r, w)) for r in body]
    return "\n".join(out)


def main():
    mode, raw_path, probe_path = sys.argv[1:4]
    raw, probe = read_tsv(raw_path), read_tsv(probe_path)
    body, ratios = rows(raw), ratio_rows(raw)
    if mode == "md":
        print(md_table(HEAD, body, 2))
        print()
        if ratios:
            print("Bulkhead ÷ peer (higher is better for Bulkhead):")
            print()
            print(md_table(RATIO_HEAD, ratios, 1))
            print()
        if probe:
            print("What each handshake settled on (`openssl s_client`, once per proxy):")
            print()
            print(md_table(PROBE_HEAD, probe, len(PROBE_HEAD)))
            print()
        print(
            "req/s, p50 and p99 are medians over the repeats; p50/p99 are wrk's `--latency`\n"
            "percentiles (HTTP/1.1) or computed from h2load's per-request log (h2). In the\n"
            "two handshake scenarios req/s is handshakes/s: conns/req is the client's TLS\n"
            "handshakes per response (1.000 = a new connection for every request) and\n"
            "resumed % the share of those that resumed a session, both counted in the client\n"
            "by tls_client_shim.c. proxy CPU% is the proxy's CPU time over the run; below\n"
            "~95 % the shared load-generator core was the limit and req/CPU-s is the fairer\n"
            "comparison. B/peer = Bulkhead ÷ that row. other CPU% is the most CPU any repeat\n"
            "saw other processes take on the proxy's core."
        )
    else:
        print(text_table(HEAD, body))
        if ratios:
            print()
            print(text_table(RATIO_HEAD, ratios))
        if probe:
            print()
            print(text_table(PROBE_HEAD, probe))


if __name__ == "__main__":
    main()
