#!/bin/sh
# Demo traffic for the compose stack (see docker-compose.yml). Runs until stopped.
set -u
gw="${GATEWAY:-http://haproxy:8080}"
req() { curl -s -o /dev/null --max-time 5 "$@" || true; }

echo "traffic: sending demo requests to $gw"
while :; do
    # acme: a handful of requests with some latency spread, one on the broken route.
    for wait in 5ms 20ms 50ms 120ms 300ms; do
        req -H 'Host: acme.localhost' "$gw/?wait=$wait"
    done
    req -H 'x-tenant-id: acme' "$gw/search?q=bulkhead"
    req -H 'Host: acme.localhost' "$gw/legacy/report"
    # globex: a burst of 20 over one connection, above its burst of 10.
    curl -s --max-time 10 -H 'Host: globex.localhost' "$gw/burst/[1-20]" >/dev/null || true
    # nobody: an unknown tenant.
    req -H 'Host: nobody.localhost' "$gw/"
    sleep 1
done
