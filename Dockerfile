# Bulkhead container image.
#
#   docker build -t bulkhead .
#   docker run --rm -p 8080:8080 -v "$PWD/deploy/bulkhead:/etc/bulkhead:ro" bulkhead
#
# Build stage: the release binary, built from the committed Cargo.lock. The cache
# mounts keep the crate registry and the target directory between builds (BuildKit,
# the default builder since Docker 23).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin bulkhead \
    && install -m 0755 target/release/bulkhead /usr/local/bin/bulkhead

# Final stage: Debian slim (glibc, matching the builder) with no extra packages.
# Bulkhead makes only plain-HTTP upstream connections, so no CA bundle is needed yet.
FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 bulkhead \
    && useradd --system --uid 10001 --gid bulkhead --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin bulkhead
COPY --from=build /usr/local/bin/bulkhead /usr/local/bin/bulkhead
# The default configuration is the compose stack's; mount your own over it
# (a directory mount of /etc/bulkhead lets SIGHUP pick up edits).
COPY deploy/bulkhead/gateway.toml /etc/bulkhead/gateway.toml
# Numeric, so that runtimes enforcing "run as non-root" can verify it.
USER 10001:10001
# 8080: data plane; 9901: admin (/metrics, /healthz, /readyz, /reload).
EXPOSE 8080 9901
# Readiness through bash's /dev/tcp, since the image has no curl or wget. It assumes
# admin_listen on port 9901 (0.0.0.0 or 127.0.0.1); change it with your config.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9901 && printf 'GET /readyz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["bulkhead"]
CMD ["run", "--config", "/etc/bulkhead/gateway.toml"]
