#!/usr/bin/env bash
# The test command of the README and of CI: installs the Debian packages the tests
# drive for real (when missing), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v curl >/dev/null 2>&1 || need+=(curl)          # HTTP/2 prior-knowledge tests
command -v promtool >/dev/null 2>&1 || need+=(prometheus) # promtool: deploy/ files, metrics exposition
command -v openssl >/dev/null 2>&1 || need+=(openssl)       # TLS version tests (s_client); tests/cluster.rs: a test CA for rediss://
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client) # HTTP/2 over TLS load (h2load)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server) # tests/cluster.rs: a real Redis per test, on a free port
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)     # tests/deploy.rs: haproxy -c on the compose stack's balancer
if [ ${#need[@]} -gt 0 ]; then
    echo "scripts/test.sh: installing ${need[*]} for the tests" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

cargo test --locked "$@"
