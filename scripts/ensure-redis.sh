#!/usr/bin/env bash
# Makes sure a Redis server answers on 127.0.0.1:${REDIS_PORT:-6379}: installs Debian's
# redis-server when it is missing and starts one (no persistence) when nothing answers.
set -euo pipefail
port="${REDIS_PORT:-6379}"

answers() { redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG; }

if command -v redis-cli >/dev/null && answers; then exit 0; fi
if ! command -v redis-server >/dev/null; then
  echo "ensure-redis: installing redis-server" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
echo "ensure-redis: starting redis-server on 127.0.0.1:$port" >&2
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
  --dir /tmp --logfile /tmp/diffguard-ci-redis.log
for _ in $(seq 1 50); do answers && exit 0; sleep 0.1; done
echo "ensure-redis: redis-server did not answer on port $port" >&2
exit 1
