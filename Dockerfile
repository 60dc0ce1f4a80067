# syntax=docker/dockerfile:1
# flowmetrics and the flowmetrics-demo traffic generator, built in release mode from
# this repository (what `cargo build --release` and `cargo build --release -p
# flowmetrics-demo` build), in a slim runtime image running as a non-root user.
#
#   docker build -t flowmetrics .
#   docker run --rm -p 4317:4317 -p 4318:4318 -p 9464:9464 flowmetrics
#   docker run --rm flowmetrics flowmetrics-demo --endpoint http://HOST:4318

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=trixie

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p flowmetrics -p flowmetrics-demo \
    && mkdir -p /out \
    && cp target/release/flowmetrics target/release/flowmetrics-demo /out/

FROM debian:${DEBIAN_RELEASE}-slim
# CA certificates: `rediss://` with the system's roots (correlation.redis.ca_file unset)
# verifies the server against them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin flowmetrics \
    && install -d -o 10001 -g 10001 /var/lib/flowmetrics
# The state file's directory (state.path): a volume mounted here starts owned by 10001.
COPY --from=builder /out/flowmetrics /out/flowmetrics-demo /usr/local/bin/
# flowmetrics binds 127.0.0.1 by default; in a container it must listen on every interface.
ENV FLOWMETRICS_LISTEN__OTLP_HTTP=0.0.0.0:4318 \
    FLOWMETRICS_LISTEN__OTLP_GRPC=0.0.0.0:4317 \
    FLOWMETRICS_LISTEN__METRICS=0.0.0.0:9464
USER 10001:10001
# 4317 OTLP/gRPC, 4318 OTLP/HTTP, 9464 /metrics /healthz /readyz
EXPOSE 4317 4318 9464
# No curl in the image: `flowmetrics probe` GETs http://127.0.0.1:9464/readyz and exits 0
# on 200, 1 otherwise (compose.yaml's healthcheck). Not a HEALTHCHECK here: the same image
# runs flowmetrics-demo, which serves nothing.
STOPSIGNAL SIGTERM
CMD ["flowmetrics"]
