#!/usr/bin/env bash
# Profile-guided build of the guard binary (`dist` profile + PGO).
#
#   scripts/pgo.sh                                   # -> target/pgo/diffguard
#   OUT=/usr/local/bin/diffguard scripts/pgo.sh
#   PGO_REUSE_GEN=1 scripts/pgo.sh                   # retrain on the instrumented build already there
#   PGO_PROFILE=target/pgo/merged-<hash>.profdata scripts/pgo.sh   # rebuild from a kept profile
#
# 1. builds an instrumented guard (-Cprofile-generate) in its own target dir;
# 2. trains it on loopback: the example upstream (examples/upstream.rs) behind one guard route per
#    request adapter and policy, every bundled image sent through each, so the profile holds engine
#    misses, cache hits (and the Redis tier when a server answers), rejects, pass-through and bad
#    input, not one benchmark request;
# 3. merges the profile (llvm-profdata: rustup's llvm-tools when installed, else a system
#    llvm-profdata of LLVM 19 or newer, which reads rustc 1.95's raw profiles);
# 4. rebuilds with -Cprofile-use and copies the binary to $OUT.
#
# Why: a cache hit is bounded by instruction-cache misses, not by any one hot loop (callgrind's
# cache simulation: 2,165 L1i misses per hit against nginx's 190; benches/proxy_vs_nginx.md,
# session 13). PGO lays out and inlines the code the profile says is hot: 18 % fewer instructions
# and 56 % fewer L1i misses per hit. Code the training does not reach (OTLP export, the training
# and eval commands) is compiled as cold: smaller, and possibly slower.
# Training takes about a minute; each of the two builds about as long as a `dist` build.
# Every process started here is killed on exit; the load stays on 127.0.0.1, bounded in time.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BASE=${PGO_DIR:-$ROOT/target/pgo}
OUT=${OUT:-$BASE/diffguard}
TRAIN_SECS=${TRAIN_SECS:-5}        # wrk seconds per route
PORT=${PGO_PORT:-18700}            # upstream PORT, guard PORT+1, ops PORT+2
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')

log() { printf '[pgo] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

find_profdata() {
  local sysroot c
  sysroot=$(rustc --print sysroot)
  for c in "$sysroot/lib/rustlib/$TRIPLE/bin/llvm-profdata" \
    $(compgen -c llvm-profdata- | sort -t- -k3 -rn | uniq) llvm-profdata; do
    command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
    local major
    major=$("$c" --version 2>/dev/null | sed -n 's/.*LLVM version \([0-9]*\).*/\1/p' | head -1)
    [ "${major:-0}" -ge 19 ] && { echo "$c"; return 0; }
  done
  return 1
}
# --target keeps RUSTFLAGS off build scripts and proc macros; each stage has its own target dir
# so the instrumented and the optimised builds do not overwrite each other's dependencies.
build() { # stage rustflags
  log "building ($1)"
  RUSTFLAGS="$2" cargo build --profile dist --locked -q -p diffguard --bin diffguard \
    --target "$TRIPLE" --target-dir "$BASE/target-$1"
}

# The optimised build from a merged profile.
build_with() { # profile
  log "profile: $1 ($(du -h "$1" | cut -f1))"
  build use "-Cprofile-use=$1"
  mkdir -p "$(dirname "$OUT")"
  cp "$BASE/target-use/$TRIPLE/dist/diffguard" "$OUT"
  log "wrote $OUT"
}

# PGO_PROFILE=FILE uses a merged profile from an earlier run: no instrumented build, no training.
if [ -n "${PGO_PROFILE:-}" ]; then
  [ -f "$PGO_PROFILE" ] || die "PGO_PROFILE=$PGO_PROFILE: no such file"
  build_with "$PGO_PROFILE"
  exit 0
fi

PROFDATA=$(find_profdata) || die "no llvm-profdata of LLVM >= 19: rustup component add llvm-tools, or apt-get install llvm-19"
command -v wrk >/dev/null || die "wrk missing (apt-get install wrk)"
log "llvm-profdata: $PROFDATA"

RAW=$BASE/raw
rm -rf "$RAW"
mkdir -p "$RAW"
GEN_BIN=$BASE/target-gen/$TRIPLE/dist/diffguard
# PGO_REUSE_GEN=1 keeps an instrumented build from an earlier run (when only the training changed).
if [ -z "${PGO_REUSE_GEN:-}" ] || [ ! -x "$GEN_BIN" ]; then
  build gen "-Cprofile-generate=$RAW"
fi
# The `dist` profile, as the Dockerfile ships the upstream: its build there is then already done.
cargo build --profile dist --locked -q -p diffguard --example upstream
UPSTREAM_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/dist/examples/upstream

WORK=$(mktemp -d /tmp/pgo.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
wait_port() {
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.2
  done
  die "nothing listens on $1"
}

"$UPSTREAM_BIN" "127.0.0.1:$PORT" 2>"$WORK/upstream.log" &
PIDS+=($!)
wait_port "$PORT"
LABELS='["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]'
# The Redis tier is trained too when a server answers (REDIS_URL, default 127.0.0.1:6379), under
# a key prefix of its own per run (so this run scores its misses) whose keys expire within the hour.
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
REDIS_TOML=""
if command -v redis-cli >/dev/null && redis-cli -u "$REDIS_URL" ping 2>/dev/null | grep -q PONG; then
  REDIS_TOML=$(printf '[cache.redis]\nurl = "%s"\nkey_prefix = "diffguard:pgo:%s:"\nttl_secs = 3600\n' "$REDIS_URL" "$$")
  log "training with the Redis tier at $REDIS_URL"
fi
# One route per adapter and policy, each on the example upstream's matching API (the raw routes
# share its /predictions/ API under prefixes of their own, stripped):
#   name | prefix | strip_prefix | request | response | policy | path sent | body kind
ROUTES=(
  'flag|/flag/|true|{ kind = "raw" }|{ kind = "top_key" }|flag|/flag/predictions/m|raw'
  'reject|/reject/|true|{ kind = "raw" }|{ kind = "top_key" }|reject|/reject/predictions/m|raw'
  'off|/off/|true|{ kind = "raw" }|{ kind = "top_key" }|off|/off/predictions/m|raw'
  'kserve|/v1/models/|false|{ kind = "kserve_v1" }|{ kind = "kserve_v1" }|flag|/v1/models/fashion:predict|kserve'
  'oip|/v2/models/|false|{ kind = "oip_v2", input = "image" }|{ kind = "oip_v2", output = "probabilities" }|reject|/v2/models/fashion/infer|oip'
  'custom|/classify|false|{ kind = "json_base64", pointer = "/image" }|{ kind = "pointer_index", pointer = "/result/class_id", logits = "/logits" }|shadow|/classify|custom'
  'upload|/upload|false|{ kind = "multipart", field = "file" }|{ kind = "pointer_name", pointer = "/result/class_name" }|flag|/upload|multipart'
)
{
  printf '[detector]\nkind = "diffguard"\nthreads = 1\nnum_classes = 10\n\n%s\n' "$REDIS_TOML"
  for r in "${ROUTES[@]}"; do
    IFS='|' read -r name prefix strip req resp policy _ _ <<<"$r"
    printf '\n[[routes]]\nname = "%s"\nprefix = "%s"\nupstream = "http://127.0.0.1:%s"\n' "$name" "$prefix" "$PORT"
    printf 'strip_prefix = %s\nrequest = %s\nresponse = %s\ninject_body = true\n' "$strip" "$req" "$resp"
    printf 'policy = { mode = "%s", wait_ms = 30000, fail_mode = "open" }\nlabels = %s\n' "$policy" "$LABELS"
  done
} >"$WORK/guard.toml"

# Request bodies of every kind for every bundled image.
IMAGES=(examples/assets/images/*.png)
mkdir -p "$WORK/bodies"
for i in "${!IMAGES[@]}"; do
  img=${IMAGES[$i]}
  b64=$(base64 -w0 "$img")
  cp "$img" "$WORK/bodies/raw-$i"
  printf '{"instances": [{"b64": "%s"}]}' "$b64" >"$WORK/bodies/kserve-$i"
  printf '{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%s"]}]}' "$b64" >"$WORK/bodies/oip-$i"
  printf '{"image": "%s"}' "$b64" >"$WORK/bodies/custom-$i"
  { printf -- '--pgo\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
    cat "$img"; printf -- '\r\n--pgo--\r\n'; } >"$WORK/bodies/multipart-$i"
done
content_type() {
  case $1 in
    raw) echo image/png ;;
    multipart) echo 'multipart/form-data; boundary=pgo' ;;
    *) echo application/json ;;
  esac
}

for r in "${ROUTES[@]}"; do
  IFS='|' read -r name _ _ _ _ _ path kind <<<"$r"
  {
    echo 'local bodies = {}'
    for i in "${!IMAGES[@]}"; do
      echo "do local f = assert(io.open(\"$WORK/bodies/$kind-$i\", \"rb\")); bodies[#bodies + 1] = f:read(\"*a\"); f:close() end"
    done
    echo "local ct = \"$(content_type "$kind")\""
    echo 'local n = 0'
    echo 'request = function()'
    echo '  n = n + 1'
    echo '  return wrk.format("POST", nil, {["Content-Type"] = ct}, bodies[n % #bodies + 1])'
    echo 'end'
  } >"$WORK/$name.lua"
done

"$GEN_BIN" serve --config "$WORK/guard.toml" \
  --listen "127.0.0.1:$((PORT + 1))" --ops-listen "127.0.0.1:$((PORT + 2))" 2>"$WORK/guard.log" &
GUARD_PID=$!
PIDS+=($GUARD_PID)
wait_port "$((PORT + 1))"
GUARD=http://127.0.0.1:$((PORT + 1))
# Misses first (each image scored once by the engine), then load over hits.
for r in "${ROUTES[@]}"; do
  IFS='|' read -r _ _ _ _ _ _ path kind <<<"$r"
  for i in "${!IMAGES[@]}"; do
    curl -s -o /dev/null --max-time 120 -X POST --data-binary "@$WORK/bodies/$kind-$i" \
      -H "Content-Type: $(content_type "$kind")" "$GUARD$path" || true
  done
done
# Bad input: not an image, a truncated PNG, invalid JSON, a forged header, an unknown route.
curl -s -o /dev/null --max-time 10 -X POST --data 'not an image' "$GUARD/flag/predictions/m" || true
head -c 100 "${IMAGES[0]}" | curl -s -o /dev/null --max-time 10 -X POST --data-binary @- \
  -H 'Content-Type: image/png' "$GUARD/flag/predictions/m" || true
curl -s -o /dev/null --max-time 10 -X POST --data '{"instances": [' -H 'Content-Type: application/json' \
  "$GUARD/v1/models/fashion:predict" || true
curl -s -o /dev/null --max-time 10 -X POST --data-binary "@${IMAGES[0]}" -H 'diffguard-verdict: ok' \
  "$GUARD/flag/predictions/m" || true
curl -s -o /dev/null --max-time 10 "$GUARD/nowhere" || true
curl -s -o /dev/null --max-time 10 "http://127.0.0.1:$((PORT + 2))/metrics" || true

for r in "${ROUTES[@]}"; do
  IFS='|' read -r name _ _ _ _ _ path _ <<<"$r"
  log "training on route $name ($path) for ${TRAIN_SECS}s"
  timeout $((TRAIN_SECS + 30)) wrk -t2 -c16 -d"${TRAIN_SECS}s" -s "$WORK/$name.lua" "$GUARD$path" \
    | grep -E 'Requests/sec|Non-2xx' >&2 || true
done
# The profile is written when the guard exits normally (SIGTERM: graceful shutdown).
kill -TERM "$GUARD_PID"
wait "$GUARD_PID" || die "the instrumented guard failed: $(tail -3 "$WORK/guard.log")"

ls "$RAW"/*.profraw >/dev/null 2>&1 || die "the instrumented guard wrote no profile"
"$PROFDATA" merge -o "$BASE/merged.profdata" "$RAW"/*.profraw
# Cargo does not watch the profile file, only RUSTFLAGS: a path named by the profile's hash makes
# a new profile rebuild everything, and an unchanged one nothing.
PROFILE=$BASE/merged-$(sha256sum "$BASE/merged.profdata" | cut -c1-16).profdata
mv "$BASE/merged.profdata" "$PROFILE"
build_with "$PROFILE"
