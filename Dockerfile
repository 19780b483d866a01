# labbook: one image with the operator CLI and the four workers.
#
#   docker build -t labbook .
#   docker run --rm labbook                       # labbook --help
#   docker run --rm --env-file .env labbook labbook-credentials
#
# Two stages: a Rust builder and a slim Debian runtime. The dependency layer is built from the
# manifests alone (with stub sources), so editing src/ or bins/ does not rebuild the crates.io
# dependencies. No BuildKit-only syntax (cache mounts, heredocs) is used, so the classic builder
# (e.g. docker-compose v1) builds it too.

# ---------------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder

# cmake: aws-lc-sys (pulled in by the AWS SDK's default HTTPS client) can fall back to a CMake
# build; having it costs little and keeps the build independent of that crate's defaults.
# Versions are not pinned on purpose (DL3008): the base image's Debian release fixes them and
# a rebuild picks up security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /build
ENV CARGO_TERM_COLOR=never \
    CARGO_NET_RETRY=5

# 1) Dependencies only. Every target path named in Cargo.toml ([lib], [[bin]], [[test]], ...)
#    gets a stub so the manifest resolves; then the whole dependency graph is compiled and cached
#    in this layer until Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN set -eu; \
    sed -n 's/^[[:space:]]*path[[:space:]]*=[[:space:]]*"\([^"]*\.rs\)".*/\1/p' Cargo.toml > /tmp/targets; \
    while read -r p; do \
        mkdir -p "$(dirname "$p")"; \
        echo '#[allow(dead_code)] fn main() {}' > "$p"; \
    done < /tmp/targets; \
    cargo build --release --locked; \
    rm -rf src bins tests

# 2) The project itself. COPY keeps the files' own mtimes, which can be older than the stub
#    build above; touching them makes cargo rebuild the labbook crate for certain.
#    migrations/ (sqlx::migrate!) and templates/ (include_str!) are embedded at compile time,
#    so the binaries need no files beside them at run time.
COPY . .
RUN set -eu; \
    find . -path ./target -prune -o -name '*.rs' -exec touch {} +; \
    cargo build --release --locked; \
    mkdir -p /out; \
    for b in labbook labbook-credentials labbook-scheduler labbook-provisioner labbook-notifier; do \
        install -m 0755 "target/release/$b" "/out/$b"; \
    done

# ---------------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# ca-certificates: TLS to AWS, amqps:// and smtps:// endpoints.
# A fixed, numeric non-root user so Kubernetes' runAsNonRoot can verify it (uid/gid 10001).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 labbook \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin labbook

COPY --from=builder /out/ /usr/local/bin/

USER 10001:10001
WORKDIR /tmp

# Structured logs in containers; every worker serves /metrics, /healthz and /readyz on 9464.
ENV LABBOOK_LOG_FORMAT=json \
    LABBOOK_METRICS_ADDR=0.0.0.0:9464
EXPOSE 9464

# Workers drain on SIGTERM (within LABBOOK_SHUTDOWN_TIMEOUT_SECONDS, default 30) and exit 0.
STOPSIGNAL SIGTERM

# No ENTRYPOINT: the command names the binary (labbook, labbook-credentials, labbook-scheduler,
# labbook-provisioner or labbook-notifier).
CMD ["labbook", "--help"]
