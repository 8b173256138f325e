#!/usr/bin/env bash
# Builds local stand-ins for the Dockerfile's two base images on a machine that reaches Debian's
# mirror and crates.io but not Docker Hub (this project's build machines):
#   debian:bookworm-slim      debootstrap --variant=minbase bookworm, imported
#   rust:1.95-slim-bookworm   that, plus gcc and this machine's own Rust 1.95.0 toolchain
# Both are tagged as the Dockerfile names them, so `docker build .` then runs unchanged. The
# builder also trusts the CA certificates this machine added (/usr/local/share/ca-certificates):
# where egress goes through a TLS-inspecting proxy, cargo inside the build needs them.
#
#   scripts/docker-offline-bases.sh && DOCKER_BUILDKIT=1 docker build -t diffguard .
#
# Needs root, docker (with its daemon running), debootstrap, and rustup's 1.95.0 toolchain.
set -euo pipefail

MIRROR=${MIRROR:-http://deb.debian.org/debian}
TOOLCHAIN=1.95.0-x86_64-unknown-linux-gnu
RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}
CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

log() { printf '[bases] %s\n' "$*" >&2; }
for cmd in docker debootstrap; do
  command -v "$cmd" >/dev/null || { log "error: $cmd missing"; exit 1; }
done
[ -d "$RUSTUP_HOME/toolchains/$TOOLCHAIN" ] || { log "error: no $TOOLCHAIN under $RUSTUP_HOME"; exit 1; }

log "debian:bookworm-slim from $MIRROR"
debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
  { tail -5 "$WORK/debootstrap.log" >&2; exit 1; }
rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb
tar -C "$WORK/rootfs" -c . | docker import -c 'CMD ["bash"]' - debian:bookworm-slim >/dev/null
rm -rf "$WORK/rootfs"

log "rust:1.95-slim-bookworm from this machine's $TOOLCHAIN"
ctx=$WORK/rust
mkdir -p "$ctx/rustup/toolchains" "$ctx/cargo-bin" "$ctx/ca"
cp -aL "$RUSTUP_HOME/toolchains/$TOOLCHAIN" "$ctx/rustup/toolchains/"
printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "default"\nauto_self_update = "disable"\n' \
  "$TOOLCHAIN" >"$ctx/rustup/settings.toml"
# rustup's proxies: each is rustup itself, dispatching on its own name.
for b in cargo rustc rustdoc rustup cargo-clippy clippy-driver rustfmt cargo-fmt; do
  cp "$CARGO_HOME/bin/$b" "$ctx/cargo-bin/"
done
cp /usr/local/share/ca-certificates/*.crt "$ctx/ca/" 2>/dev/null || true
cat >"$ctx/Dockerfile" <<'EOF'
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
COPY rustup /usr/local/rustup
COPY cargo-bin /usr/local/cargo/bin
EOF
docker build -q -t rust:1.95-slim-bookworm "$ctx" >/dev/null
docker run --rm rust:1.95-slim-bookworm rustc --version
log "done: debian:bookworm-slim and rust:1.95-slim-bookworm are local images"
