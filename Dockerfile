# syntax=docker/dockerfile:1
# Why this file exists: one image carries all five chatfleet services; the
# container's command picks the binary (compose `command:`, Helm `command:`),
# so every service ships from one build, one set of dependencies, one scan.
#
#   docker build -t chatfleet:dev .
#   docker run --rm chatfleet:dev chatwebsocketshandler
#
# Stage 1 (deps) compiles the dependency graph from the manifests alone, so a
# change to our sources does not rebuild the ~400 crates underneath (librdkafka
# included). Stage 2 (build) compiles our code. Stage 3 (runtime) is Debian 12
# slim with the binaries, the email templates and a non-root user.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS deps
# rdkafka-sys builds librdkafka from source with its own configure script: it
# needs a C toolchain, make and zlib headers, all in the rust:bookworm image
# (buildpack-deps). No cmake (the cmake-build feature is off), no OpenSSL (no
# TLS to Kafka is compiled in; reqwest and lettre use rustls).
WORKDIR /src
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0
COPY Cargo.toml Cargo.lock ./
# Every workspace member's manifest (tests/tests/deploy_image.rs checks that
# none is missing).
COPY crates/chatstream/Cargo.toml crates/chatstream/
COPY crates/servicekit/Cargo.toml crates/servicekit/
COPY crates/eventstore/Cargo.toml crates/eventstore/
COPY crates/kafkawrapper/Cargo.toml crates/kafkawrapper/
COPY crates/testkit/Cargo.toml crates/testkit/
COPY crates/chatauth/Cargo.toml crates/chatauth/
COPY crates/wsfanout/Cargo.toml crates/wsfanout/
COPY crates/mongokit/Cargo.toml crates/mongokit/
COPY crates/presence/Cargo.toml crates/presence/
COPY services/chatpersistence/Cargo.toml services/chatpersistence/
COPY services/chatpersistencechangehandler/Cargo.toml services/chatpersistencechangehandler/
COPY services/chatwebsocketshandler/Cargo.toml services/chatwebsocketshandler/
COPY services/generalnotificationshandler/Cargo.toml services/generalnotificationshandler/
COPY services/emailhandler/Cargo.toml services/emailhandler/
COPY tests/Cargo.toml tests/
# Stub sources (src/lib.rs, src/main.rs and every `path = "….rs"` a manifest
# names) let cargo build the dependencies only; the stubs are removed again.
RUN set -eu; \
    for manifest in crates/*/Cargo.toml services/*/Cargo.toml tests/Cargo.toml; do \
      dir="${manifest%/Cargo.toml}"; \
      mkdir -p "$dir/src"; \
      for file in src/lib.rs src/main.rs $(sed -n 's/^path *= *"\(.*\.rs\)"/\1/p' "$manifest"); do \
        mkdir -p "$dir/$(dirname "$file")"; \
        printf 'fn main() {}\n' > "$dir/$file"; \
      done; \
    done; \
    cargo build --release --locked \
      -p chatpersistence -p chatpersistencechangehandler -p chatwebsocketshandler \
      -p generalnotificationshandler -p emailhandler; \
    rm -rf crates/*/src services/*/src tests/src

FROM deps AS build
COPY crates crates
COPY services services
COPY tests tests
# The stub build left fingerprints newer than the copied sources: touch them so
# cargo rebuilds our crates (and only those).
RUN set -eu; \
    find crates services tests -name '*.rs' -exec touch {} +; \
    cargo build --release --locked \
      -p chatpersistence -p chatpersistencechangehandler -p chatwebsocketshandler \
      -p generalnotificationshandler -p emailhandler; \
    mkdir -p /out/bin /out/templates; \
    for bin in chatpersistence chatpersistencechangehandler chatwebsocketshandler \
               generalnotificationshandler emailhandler; do \
      install -m 0755 "target/release/$bin" /out/bin/; \
    done; \
    if [ -d services/emailhandler/templates ]; then \
      cp -R services/emailhandler/templates/. /out/templates/; \
    fi

FROM ${RUNTIME_IMAGE} AS runtime
# ca-certificates: TLS to SMTP relays, MongoDB Atlas and the like. The binaries
# link only glibc, libgcc_s, libm and zlib (checked with ldd), all in the base.
# Not version-pinned (DL3008): Debian replaces ca-certificates in place with
# security updates, and an old pin stops resolving; the base image tag pins
# the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 chatfleet \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
         --shell /usr/sbin/nologin chatfleet
COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=build /out/templates/ /usr/share/chatfleet/templates/
ENV EMAIL_TEMPLATES_DIR=/usr/share/chatfleet/templates \
    HTTP_HOST=0.0.0.0 \
    HTTP_PORT=8080 \
    INTERNAL_HTTP_PORT=9090 \
    LOG_FORMAT=json \
    LOG_LEVEL=info
# Numeric user, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
EXPOSE 8080 9090
# A real HTTP check without curl in the image: bash (essential in Debian) opens
# the public listener, sends GET /healthz and requires the status line to say
# 200. Docker's --timeout bounds it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${HTTP_PORT:-8080} && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && read -r _ status _ <&3 && [ \"$status\" = 200 ]"]
STOPSIGNAL SIGTERM
CMD ["chatpersistence"]
