# syntax=docker/dockerfile:1
#
# The streamworker image: one process per container, configured by a TOML file mounted at
# /etc/streamworker/streamworker.toml (or any path in STREAMWORKER_CONFIG).
#
#   docker build --build-arg STREAMWORKER_COMMIT="$(git rev-parse --short HEAD)" -t streamworker .
#   docker run --rm -v "$PWD/deploy/compose/streamworker.toml:/etc/streamworker/streamworker.toml:ro" \
#       streamworker check
#   docker run -d -v "$PWD/streamworker.toml:/etc/streamworker/streamworker.toml:ro" \
#       -v streamworker-data:/var/lib/streamworker --read-only streamworker
#
# Files the groups write (warehouse, learning dataset: relative paths) go to the data
# directory /var/lib/streamworker, the working directory and a VOLUME.
#
# Kubernetes manifests and a docker-compose file that use it: deploy/.

# Base images pinned to versions: the toolchain by its full version, the runtime by digest
# (distroless publishes no version tags; the tag is for the reader). Bump both on purpose.
ARG RUST_VERSION=1.95.0

# ---- build ----------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src

# Dependencies first, in their own layer: only the manifests and the lock file, with stub
# sources, so that editing src/ does not rebuild the dependency graph.
COPY Cargo.toml Cargo.lock ./
COPY handlers/Cargo.toml handlers/
COPY examples/custom-handler/Cargo.toml examples/custom-handler/
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    mkdir -p src handlers/src examples/custom-handler/src \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > examples/custom-handler/src/main.rs \
    && touch src/lib.rs handlers/src/lib.rs examples/custom-handler/src/lib.rs \
    && cargo build --release --locked --package streamworker \
    && rm -rf src handlers/src examples/custom-handler/src

# The real sources. COPY keeps their modification times, which may be older than the stub
# build's outputs: touch the crate roots so cargo rebuilds both workspace crates instead of
# shipping the stub (the --version check below would catch that: the stub prints nothing).
COPY src src
COPY handlers/src handlers/src
# The example handler crate is a workspace member: cargo reads it, never builds it here.
COPY examples/custom-handler/src examples/custom-handler/src
# The commit the binary reports (`streamworker --version`, streamworker_build_info);
# declared here so that a new commit does not invalidate the dependency layer above.
ARG STREAMWORKER_COMMIT=unknown
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    touch src/main.rs src/lib.rs handlers/src/lib.rs \
    && STREAMWORKER_COMMIT="${STREAMWORKER_COMMIT}" cargo build --release --locked --package streamworker \
    && ./target/release/streamworker --version | grep -F "${STREAMWORKER_COMMIT}"

# The data directory, owned by the image's user: relative paths in the configuration
# (warehouse `directory = "data/warehouse"`, learning `dataset_dir`, …) resolve against the
# working directory, which is this directory. The runtime stage has no shell to make it.
RUN install -d -o 10001 -g 10001 -m 0750 /image/var/lib/streamworker

# ---- runtime --------------------------------------------------------------------------
# Distroless cc: glibc, libgcc, CA certificates (rediss:// and https:// webhooks verify
# servers against them) and nothing else: no shell, no package manager. Debian 12, as the
# build stage, so the binary finds the glibc it was linked against.
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f AS runtime
ARG STREAMWORKER_COMMIT=unknown
LABEL org.opencontainers.image.title="streamworker" \
      org.opencontainers.image.description="Runs Redis Streams consumer groups: reclaim, retries, dead letters, graceful shutdown, metrics." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${STREAMWORKER_COMMIT}"

COPY --from=build /src/target/release/streamworker /usr/local/bin/streamworker
COPY --from=build --chown=10001:10001 /image/var/lib/streamworker /var/lib/streamworker

# The configuration is mounted here (a ConfigMap, a bind mount); `-c` defaults to it.
ENV STREAMWORKER_CONFIG=/etc/streamworker/streamworker.toml

# Numeric, so that Kubernetes' runAsNonRoot can verify it (the distroless base's own
# `nonroot` user is not used: the manifests and volumes expect 10001).
USER 10001:10001

# Files the groups write (relative paths) land here. A volume, so that they outlive the
# container and the root filesystem can be read-only; Docker copies the directory's owner
# into a new named volume.
WORKDIR /var/lib/streamworker
VOLUME ["/var/lib/streamworker"]

# http.listen: /metrics, /livez, /readyz.
EXPOSE 9464

# The binary asks its own /livez on the configuration's http.listen (exit 0 on 200, 1
# otherwise, within its default --timeout of 2 s, inside Docker's 3 s): no shell, curl or
# wget needed. /livez stays 200 while Redis is down (that is
# /readyz's business), so an outage does not get replicas restarted.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/streamworker", "healthcheck"]

# The daemon is PID 1 and handles SIGTERM/SIGINT itself: the first drains (up to
# worker.shutdown_timeout) and exits 0, a second exits at once with 130.
ENTRYPOINT ["/usr/local/bin/streamworker"]
CMD ["run"]
