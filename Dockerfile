# Multi-stage build: compile in the Rust image, run in debian-slim as a non-root user. Needs BuildKit
# (the default since Docker 23; `DOCKER_BUILDKIT=1` before): the build stage uses cache mounts,
# which its built-in Dockerfile frontend understands, so no `# syntax=` line sends it to Docker Hub
# for another. Where Docker Hub is out of reach, scripts/docker-offline-bases.sh builds local
# stand-ins for the two base images first.
#   docker build -t diffguard .
#   docker build --build-arg PGO=1 -t diffguard .              # profile-guided guard binary
#   docker run -p 8080:8080 -p 9090:9090 diffguard            # embedded default config
#   docker run -v $PWD/config:/etc/diffguard diffguard serve --config /etc/diffguard/redis.toml

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# rust-toolchain.toml pins 1.95.0; the image already has it, so rustup does not download.
COPY rust-toolchain.toml Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY src ./src
COPY examples ./examples
COPY config ./config
# The guard is built with the `dist` profile (fat LTO, one codegen unit: about 8 % fewer
# instructions per proxied request than `release`, benches/proxy_vs_nginx.md). The example
# upstream needs no such care, but built with the same profile it reuses the guard's compiled
# dependencies instead of compiling them all again. With --build-arg PGO=1 the guard is built
# profile-guided (scripts/pgo.sh: instrumented build, a minute of loopback training on the bundled
# models and images, rebuild): about 18 % fewer instructions per cache hit, at twice the build time.
ARG PGO=0
COPY scripts ./scripts
COPY models ./models
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    mkdir -p /out \
 && if [ "$PGO" = 1 ]; then \
      apt-get update && apt-get install -y --no-install-recommends curl wrk llvm-19 \
      && OUT=/out/diffguard scripts/pgo.sh; \
    else \
      cargo build --profile dist --locked -p diffguard --bin diffguard \
      && cp target/dist/diffguard /out/diffguard; \
    fi \
 && cargo build --profile dist --locked -p diffguard --example upstream \
 && cp target/dist/examples/upstream /out/diffguard-upstream

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin diffguard
COPY --from=build /out/diffguard /out/diffguard-upstream /usr/local/bin/
COPY config /etc/diffguard
# The embedded default bundle (the detector's models; the example upstream serves its classifier).
COPY models/fashion-mnist-latent /usr/share/diffguard/models/fashion-mnist-latent
USER 10001
# Inside a container the guard must listen beyond loopback.
ENV DIFFGUARD_LISTEN=0.0.0.0:8080 \
    DIFFGUARD_OPS_LISTEN=0.0.0.0:9090 \
    DIFFGUARD_BUNDLE=/usr/share/diffguard/models/fashion-mnist-latent \
    RUST_LOG=info
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/diffguard"]
CMD ["serve"]
