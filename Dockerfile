# syntax=docker/dockerfile:1
#
# The streamworker image: one process per container, configured by a TOML file mounted at
# /etc/streamworker/streamworker.toml (or any path in STREAMWORKER_CONFIG).
#
#   docker build --build-arg STREAMWORKER_COMMIT="$(git rev-parse --short HEAD)" -t streamworker .
#   docker run --rm -v "$PWD/deploy/compose/streamworker.toml:/etc/streamworker/streamworker.toml:ro" \
#       streamworker check
#
# Kubernetes manifests and a docker-compose file that use it: deploy/.

ARG RUST_VERSION=1

# ---- build ----------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src

# Dependencies first, in their own layer: only the manifests and the lock file, with stub
# sources, so that editing src/ does not rebuild the dependency graph.
COPY Cargo.toml Cargo.lock ./
COPY handlers/Cargo.toml handlers/
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    mkdir -p src handlers/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs handlers/src/lib.rs \
    && cargo build --release --locked --package streamworker \
    && rm -rf src handlers/src

# The real sources. COPY keeps their modification times, which may be older than the stub
# build's outputs: touch the crate roots so cargo rebuilds both workspace crates instead of
# shipping the stub (the --version check below would catch that: the stub prints nothing).
COPY src src
COPY handlers/src handlers/src
# The commit the binary reports (`streamworker --version`, streamworker_build_info);
# declared here so that a new commit does not invalidate the dependency layer above.
ARG STREAMWORKER_COMMIT=unknown
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    touch src/main.rs src/lib.rs handlers/src/lib.rs \
    && STREAMWORKER_COMMIT="${STREAMWORKER_COMMIT}" cargo build --release --locked --package streamworker \
    && ./target/release/streamworker --version | grep -F "${STREAMWORKER_COMMIT}"

# ---- runtime --------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
ARG STREAMWORKER_COMMIT=unknown
LABEL org.opencontainers.image.title="streamworker" \
      org.opencontainers.image.description="Runs Redis Streams consumer groups: reclaim, retries, dead letters, graceful shutdown, metrics." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${STREAMWORKER_COMMIT}"

# ca-certificates: rediss:// and https:// webhooks verify servers against the system roots.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 streamworker \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin streamworker \
    && mkdir -p /etc/streamworker

COPY --from=build /src/target/release/streamworker /usr/local/bin/streamworker

# The configuration is mounted here (a ConfigMap, a bind mount); `-c` defaults to it.
ENV STREAMWORKER_CONFIG=/etc/streamworker/streamworker.toml

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# http.listen: /metrics, /livez, /readyz.
EXPOSE 9464

# bash built-ins only (no curl or wget in the image, no child process to reap): one HTTP/1.0
# request to /livez, healthy when the status is 200. /livez stays 200 while Redis is down
# (that is /readyz's business), so an outage does not get replicas restarted.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9464 && printf 'GET /livez HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && read -r -t 2 _ status _ <&3 && [ \"$status\" = 200 ]"]

# The daemon is PID 1 and handles SIGTERM/SIGINT itself: the first drains (up to
# worker.shutdown_timeout) and exits 0, a second exits at once with 130.
ENTRYPOINT ["/usr/local/bin/streamworker"]
CMD ["run"]
