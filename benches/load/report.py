#!/usr/bin/env python3
"""Turn run.sh's raw per-run rows into the medians table (text or markdown).

    report.py text|md RAW_TSV IDLE_TSV

RAW_TSV columns (one row per measured run, scenarios a-c):
    scenario proto proxy rep rps p50_ms p99_ms cpu_pct errors other_cpu_pct
IDLE_TSV columns (one row per measured run, scenario d):
    proxy rep rss_before_kib rss_after_kib opened failed alive

Every figure printed is the median over the repeats of that cell, each
column taken independently. Standard library only.
"""

import os
import statistics
import sys


def count(name, default):
    """10000 -> "10k", as the scenario labels use them."""
    n = int(os.environ.get(name, default))
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


TENANTS_B, HOT_TENANTS = count("TENANTS_B", 10000), count("HOT_TENANTS", 1000)
IDLE_CONNS = count("IDLE_CONNS", 10000)
SCENARIOS = {
    "a": "a: 1 tenant",
    "a1": "a1: 1 tenant, b's Lua client",
    "b": f"b: {TENANTS_B} tenants, {HOT_TENANTS} hot",
    "c": "c: 1 KiB POST",
    "f": f"f: a at one load ({os.environ.get('PACE_MS', '1')} ms pace)",
    "g": f"g: a at {os.environ.get('RATE', '70000')} req/s (h2load)",
}
PROXY_ORDER = ["bulkhead", "nginx", "haproxy", "l4", "direct"]
PROTO_LABEL = {"h1": "HTTP/1.1", "h2": "h2c"}


def fnum(x):
    try:
        return float(x)
    except ValueError:
        return None


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def read_tsv(path):
    try:
        with open(path) as f:
            return [line.rstrip("\n").split("\t") for line in f if line.strip()]
    except FileNotFoundError:
        return []


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def aggregate(rows):
    cells = {}
    for row in rows:
        scen, proto, proxy, _rep, rps, p50, p99, cpu, errors = row[:9]
        other = fnum(row[9]) if len(row) > 9 else None
        c = cells.setdefault((scen, proto, proxy),
                             {"rps": [], "p50": [], "p99": [], "cpu": [], "eff": [],
                              "other": [], "errors": 0, "runs": 0})
        c["other"].append(other)
        rps, cpu = fnum(rps), fnum(cpu)
        c["rps"].append(rps)
        c["p50"].append(fnum(p50))
        c["p99"].append(fnum(p99))
        c["cpu"].append(cpu)
        c["eff"].append(rps / (cpu / 100) if rps is not None and cpu else None)
        c["errors"] += int(errors)
        c["runs"] += 1
    return {k: {"rps": median(v["rps"]), "p50": median(v["p50"]), "p99": median(v["p99"]),
                "cpu": median(v["cpu"]), "eff": median(v["eff"]),
                "other": max((x for x in v["other"] if x is not None), default=None),
                "errors": v["errors"], "runs": v["runs"]}
            for k, v in cells.items()}


def ratio(a, b):
    return a / b if a is not None and b else None


def load_table(cells):
    header = ["scenario", "proto", "proxy", "req/s", "p50 ms", "p99 ms", "proxy CPU%",
              "req/CPU-s", "B/peer req/s", "B/peer p99", "B/peer req/CPU-s", "errors",
              "other CPU%"]
    out = []
    keys = sorted({(s, p) for s, p, _ in cells},
                  key=lambda k: (k[0], ["h1", "h2"].index(k[1])))
    for scen, proto in keys:
        b = cells.get((scen, proto, "bulkhead"))
        label = SCENARIOS.get(scen, scen)
        if scen == "b" and proto == "h2":
            label = f"b: {TENANTS_B} tenants, 1 hot (h2)"
        for proxy in PROXY_ORDER:
            c = cells.get((scen, proto, proxy))
            if c is None:
                continue
            # Proxies send the backend HTTP/1.1 whatever the client spoke; only the direct
            # h2c run makes the backend (on the load generator's core) do h2 framing itself,
            # so for h2c that row is a reference, not a ceiling.
            name = proxy
            if proxy == "l4":
                name = "l4 (no HTTP work)"
            if proxy == "direct":
                name = "direct (ceiling)" if proto == "h1" else "direct (h2c ref.)"
            if b is None or proxy == "bulkhead":
                r_rps = r_p99 = r_eff = None
            else:
                r_rps = ratio(b["rps"], c["rps"])
                r_p99 = ratio(b["p99"], c["p99"])
                r_eff = ratio(b["eff"], c["eff"])
            out.append([label, PROTO_LABEL.get(proto, proto), name,
                        fmt(c["rps"], ",.0f"), fmt(c["p50"], ".3f"), fmt(c["p99"], ".3f"),
                        fmt(c["cpu"], ".0f"), fmt(c["eff"], ",.0f"),
                        fmt(r_rps, ".2f"), fmt(r_p99, ".2f"), fmt(r_eff, ".2f"),
                        str(c["errors"]) if c["errors"] else "",
                        fmt(c["other"], ".0f")])
    return header, out


def idle_table(rows):
    per = {}
    for proxy, _rep, before, after, opened, failed, alive in rows:
        d = per.setdefault(proxy, {"kib": [], "before": [], "after": [], "opened": [],
                                   "failed": 0, "closed": 0})
        before, after, opened = float(before), float(after), int(opened)
        d["before"].append(before)
        d["after"].append(after)
        d["opened"].append(opened)
        d["kib"].append((after - before) / opened if opened else None)
        d["failed"] += int(failed)
        d["closed"] += opened - int(alive) if alive != "-" else 0
    header = ["proxy", "RSS before MiB", "RSS after MiB", "conns held", "KiB per conn",
              "B/peer", "failed+closed"]
    b = median(per["bulkhead"]["kib"]) if "bulkhead" in per else None
    out = []
    for proxy in PROXY_ORDER:
        if proxy not in per:
            continue
        d = per[proxy]
        kib = median(d["kib"])
        r = None if proxy == "bulkhead" or b is None else ratio(b, kib)
        bad = d["failed"] + d["closed"]
        out.append([proxy, fmt(median(d["before"]) / 1024, ".1f"),
                    fmt(median(d["after"]) / 1024, ".1f"), fmt(median(d["opened"]), ".0f"),
                    fmt(kib, ".2f"), fmt(r, ".2f"), str(bad) if bad else ""])
    return header, out, per


def paired(rows, proto, proxy, base="a"):
    """(b)/(base) of each repeat that has both, in repeat order."""
    by = {}
    for row in rows:
        scen, p, x, rep, rps = row[:5]
        if p == proto and x == proxy and scen in (base, "b"):
            by.setdefault(rep, {})[scen] = fnum(rps)
    pairs = (ratio(v.get("b"), v.get(base)) for _, v in sorted(by.items(), key=lambda kv: int(kv[0])))
    return [r for r in pairs if r is not None]


def by_repeat(rows, scen, proto, first="bulkhead"):
    """Per repeat that has `first` and a peer (nginx, HAProxy): {proxy: (rps, p99)}, in
    repeat order."""
    by = {}
    for row in rows:
        sc, p, x, rep, rps, _p50, p99 = row[:7]
        if sc == scen and p == proto and x in (first, "nginx", "haproxy"):
            by.setdefault(int(rep), {})[x] = (fnum(rps), fnum(p99))
    return [v for _, v in sorted(by.items()) if first in v and len(v) > 1]


def over_faster_peer(v, first="bulkhead"):
    """In one repeat of by_repeat: `first`'s req/s over the faster peer's."""
    return ratio(v[first][0], max(v[x][0] or 0 for x in v if x != first))


def goals(cells, idle_per, rows):
    """The issue's goals, evaluated on this run's medians (figures, not asserts)."""
    lines = []

    def get(s, p, x):
        return cells.get((s, p, x))

    b, n, h = get("a", "h1", "bulkhead"), get("a", "h1", "nginx"), get("a", "h1", "haproxy")
    peers = [c for c in (n, h) if c]
    if b and peers:
        best = max(c["rps"] or 0 for c in peers)
        low_p99 = min(c["p99"] for c in peers if c["p99"] is not None)
        r = ratio(b["rps"], best)
        ok = r is not None and r >= 1.10 and b["p99"] is not None and b["p99"] <= low_p99
        lines.append(f"- goal 1, (a) HTTP/1.1: Bulkhead = {fmt(r, '.2f')} x the faster peer "
                     f"(goal >= 1.10); p99 {fmt(b['p99'], '.3f')} ms vs lowest peer "
                     f"{low_p99:.3f} ms (goal <=): {'MET' if ok else 'NOT MET'}")
        reps = by_repeat(rows, "a", "h1")
        if len(reps) > 1:
            # Each repeat's proxies ran seconds apart, at much the same machine speed.
            rs, met, low = [], 0, 0
            for v in reps:
                r1 = over_faster_peer(v)
                rs.append(r1)
                p99s = [v[x][1] for x in v if x != "bulkhead" and v[x][1] is not None]
                p99_ok = bool(v["bulkhead"][1] is not None and p99s
                              and v["bulkhead"][1] <= min(p99s))
                low += p99_ok
                met += bool(r1 is not None and r1 >= 1.10 and p99_ok)
            lines.append(f"  per repeat, Bulkhead / the faster peer: "
                         f"{', '.join(fmt(x, '.2f') for x in rs)}; p99 <= the lower peer's "
                         f"in {low} of {len(reps)} repeats, both parts of the goal in {met}")
        l4 = get("a", "h1", "l4")
        if l4:
            # A forwarder with no HTTP work: how far above the peers this layout lets
            # any proxy get before the load generator's core is the limit.
            line = (f"  l4 (HAProxy in mode tcp, no HTTP work) = "
                    f"{fmt(ratio(l4['rps'], best), '.2f')} x the faster peer")
            l4reps = by_repeat(rows, "a", "h1", "l4")
            if len(l4reps) > 1:
                line += (", per repeat "
                         + ", ".join(fmt(over_faster_peer(v, "l4"), ".2f") for v in l4reps))
            lines.append(line + f"; Bulkhead = {fmt(ratio(b['rps'], l4['rps']), '.2f')} x l4")
    # (f) and (g), HTTP/1.1: p99 with every proxy offered the same load, under all their
    # ceilings (f) or near the slowest one's (g).
    for scen, load in (("f", "one offered load"),
                       ("g", f"{os.environ.get('RATE', '70000')} req/s offered")):
        fb = get(scen, "h1", "bulkhead")
        named = (("nginx", get(scen, "h1", "nginx")), ("HAProxy", get(scen, "h1", "haproxy")))
        fpeers = [c for _, c in named if c and c["p99"] is not None]
        if not (fb and fpeers and fb["p99"] is not None):
            continue
        low_p99 = min(c["p99"] for c in fpeers)
        ok = fb["p99"] <= low_p99
        line = (f"- goal 1's p99 at {load}, ({scen}) HTTP/1.1: Bulkhead "
                f"{fb['p99']:.3f} ms vs lowest peer {low_p99:.3f} ms (goal <=): "
                f"{'MET' if ok else 'NOT MET'}; req/s Bulkhead {fmt(fb['rps'], ',.0f')}, "
                + ", ".join(f"{n} {fmt(c['rps'], ',.0f')}" for n, c in named
                          if c and c["p99"] is not None))
        reps = by_repeat(rows, scen, "h1")
        if len(reps) > 1:
            low = sum(bool(v["bulkhead"][1] is not None and v["bulkhead"][1] <= min(
                v[x][1] for x in v if x != "bulkhead" and v[x][1] is not None))
                for v in reps if any(v[x][1] is not None for x in v if x != "bulkhead"))
            line += f"; p99 <= the lower peer's in {low} of {len(reps)} repeats"
        lines.append(line)
    b2, h2 = get("a", "h2", "bulkhead"), get("a", "h2", "haproxy")
    if b2 and h2:
        r = ratio(b2["rps"], h2["rps"])
        lines.append(f"- goal 1, (a) h2c: Bulkhead = {fmt(r, '.2f')} x HAProxy (goal >= 1.0): "
                     f"{'MET' if r is not None and r >= 1.0 else 'NOT MET'}")
    def b_over(base, proto):
        """(b)/(base) of the medians: Bulkhead's, and the direct run's."""
        out = []
        for proxy in ("bulkhead", "direct"):
            x, y = get(base, proto, proxy), get("b", proto, proxy)
            out.append(ratio(y["rps"], x["rps"]) if x and y else None)
        return out

    for proto in ("h1", "h2"):
        ba, bb = get("a", proto, "bulkhead"), get("b", proto, "bulkhead")
        if ba and bb:
            r, dr = b_over("a", proto)
            lines.append(f"- goal 2, {PROTO_LABEL[proto]}: Bulkhead (b)/(a) = {fmt(r, '.3f')} "
                         f"(goal >= 0.95; the same client against the backend directly gives "
                         f"{fmt(dr, '.3f')}, i.e. the load generator's own cost): "
                         f"{'MET' if r is not None and r >= 0.95 else 'NOT MET'}")
            pairs = paired(rows, proto, "bulkhead")
            if os.environ.get("PAIRED") == "1" and pairs:
                # Back to back, each repeat's (a) and (b) share the machine's speed.
                pr = median(pairs)
                direct = median(paired(rows, proto, "direct"))
                lines.append(f"  paired by repeat ((a) and (b) of one repeat back to back): "
                             f"{', '.join(format(x, '.3f') for x in pairs)}; median "
                             f"{pr:.3f} (direct {fmt(direct, '.3f')}): "
                             f"{'MET' if pr >= 0.95 else 'NOT MET'}")
        if get("a1", proto, "bulkhead") and bb:
            # The same client in both: what the tenant count alone costs.
            r, dr = b_over("a1", proto)
            line = (f"  (b)/(a1), one tenant with (b)'s Lua client: {fmt(r, '.3f')} "
                    f"(direct {fmt(dr, '.3f')})")
            pairs = paired(rows, proto, "bulkhead", "a1")
            if os.environ.get("PAIRED") == "1" and pairs:
                line += (f"; paired {', '.join(format(x, '.3f') for x in pairs)}, median "
                         f"{median(pairs):.3f} (direct "
                         f"{fmt(median(paired(rows, proto, 'direct', 'a1')), '.3f')})")
            lines.append(line)
    if "bulkhead" in idle_per and "haproxy" in idle_per:
        bk = median(idle_per["bulkhead"]["kib"])
        hk = median(idle_per["haproxy"]["kib"])
        ok = bk is not None and hk is not None and bk <= hk
        lines.append(f"- goal 3, (d) idle memory: Bulkhead {fmt(bk, '.2f')} KiB/conn vs HAProxy "
                     f"{fmt(hk, '.2f')} KiB/conn (goal <=): {'MET' if ok else 'NOT MET'}")
    noisy = [c["other"] for c in cells.values() if c["other"] is not None]
    if noisy and max(noisy) >= 5:
        lines.append(f"- other processes used up to {max(noisy):.0f}% of the proxy's core "
                     "during some runs (column \"other CPU%\"): those figures are skewed")
    if any(c["errors"] for c in cells.values()) or any(
            d["failed"] or d["closed"] for d in idle_per.values()):
        lines.append("- some rows above had errors or lost connections: "
                     "the verdicts that use them are not valid")
    return lines


def render(fmt_kind, header, rows):
    if not rows:
        return []
    if fmt_kind == "md":
        right = {i for i, h in enumerate(header) if i >= 3 or h in ("conns held",)}
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return lines
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cols: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cols, widths)))
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def main():
    kind, raw, idle = sys.argv[1], sys.argv[2], sys.argv[3]
    cells = aggregate(read_tsv(raw))
    out = []
    h, rows = load_table(cells)
    out += render(kind, h, rows)
    ih, irows, per = idle_table(read_tsv(idle))
    if irows:
        title = f"d: {IDLE_CONNS} idle keep-alive connections (HTTP/1.1), proxy RSS"
        out += ["", title if kind == "text" else f"**{title}**", ""]
        out += render(kind, ih, irows)
    g = goals(cells, per, read_tsv(raw))
    if g:
        out += ["", "Goals (issue 7), on this run's medians:" if kind == "text"
                else "**Goals (issue 7), on this run's medians:**", ""]
        out += g
    print("\n".join(out))


if __name__ == "__main__":
    main()
