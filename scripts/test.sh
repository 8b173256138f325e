#!/usr/bin/env bash
# The README's test command: prepares what the tests need on a fresh machine (a Redis server on
# loopback, the real datasets) and runs the whole workspace's tests.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-redis.sh
if [ -x scripts/fetch-data.sh ]; then scripts/fetch-data.sh; fi
cargo test --workspace "$@"
