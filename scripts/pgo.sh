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
PROFDATA=$(find_profdata) || die "no llvm-profdata of LLVM >= 19: rustup component add llvm-tools, or apt-get install llvm-19"
command -v wrk >/dev/null || die "wrk missing (apt-get install wrk)"
log "llvm-profdata: $PROFDATA"

# --target keeps RUSTFLAGS off build scripts and proc macros; each stage has its own target dir
# so the instrumented and the optimised builds do not overwrite each other's dependencies.
build() { # stage rustflags
  log "building ($1)"
  RUSTFLAGS="$2" cargo build --profile dist --locked -q -p diffguard --bin diffguard \
    --target "$TRIPLE" --target-dir "$BASE/target-$1"
}

RAW=$BASE/raw
GEN_BIN=$BASE/target-gen/$TRIPLE/dist/diffguard
# PGO_REUSE_GEN=1 keeps an instrumented build from an earlier run (when only the training changed);
# PGO_PROFILE=FILE uses a merged profile from an earlier run and skips that stage.
PROFILE=${PGO_PROFILE:-}
[ -z "$PROFILE" ] || [ -f "$PROFILE" ] || die "PGO_PROFILE=$PROFILE: no such file"
[ -n "$PROFILE" ] || { rm -rf "$RAW"; mkdir -p "$RAW"; }
if [ -z "$PROFILE" ] && { [ -z "${PGO_REUSE_GEN:-}" ] || [ ! -x "$GEN_BIN" ]; }; then
  build gen "-Cprofile-generate=$RAW"
fi
cargo build --release --locked -q -p diffguard --example upstream
UPSTREAM_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/upstream

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
# a key prefix of its own per run and stage (so each stage scores its misses) whose keys expire
# within the hour.
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
REDIS_TOML=""
if command -v redis-cli >/dev/null && redis-cli -u "$REDIS_URL" ping 2>/dev/null | grep -q PONG; then
  REDIS_TOML=$(printf '[cache.redis]\nurl = "%s"\nkey_prefix = "diffguard:pgo:%s:@STAGE@:"\nttl_secs = 3600\n' "$REDIS_URL" "$$")
  log "training with the Redis tier at $REDIS_URL"
fi
# One route per adapter and policy, each on the example upstream's matching API:
#   name | prefix | request | response | policy | path sent | body kind
ROUTES=(
  'flag|/flag/|{ kind = "raw" }|{ kind = "top_key" }|flag|/flag/predictions/m|raw'
  'reject|/reject/|{ kind = "raw" }|{ kind = "top_key" }|reject|/reject/predictions/m|raw'
  'off|/off/|{ kind = "raw" }|{ kind = "top_key" }|off|/off/predictions/m|raw'
  'kserve|/v1/models/|{ kind = "kserve_v1" }|{ kind = "kserve_v1" }|flag|/v1/models/fashion:predict|kserve'
  'oip|/v2/models/|{ kind = "oip_v2", input = "image" }|{ kind = "oip_v2", output = "probabilities" }|reject|/v2/models/fashion/infer|oip'
  'custom|/classify|{ kind = "json_base64", pointer = "/image" }|{ kind = "pointer_index", pointer = "/result/class_id", logits = "/logits" }|shadow|/classify|custom'
  'upload|/upload|{ kind = "multipart", field = "file" }|{ kind = "pointer_name", pointer = "/result/class_name" }|flag|/upload|multipart'
)
write_config() { # stage -> $WORK/guard-<stage>.toml
  {
    printf '[detector]\nkind = "diffguard"\nthreads = 1\nnum_classes = 10\n\n%s\n' "${REDIS_TOML//@STAGE@/$1}"
    for r in "${ROUTES[@]}"; do
      IFS='|' read -r name prefix req resp policy _ _ <<<"$r"
      # The raw routes share the upstream's /predictions/ API under prefixes of their own.
      strip=false
      [[ $name == flag || $name == reject || $name == off ]] && strip=true
      printf '\n[[routes]]\nname = "%s"\nprefix = "%s"\nupstream = "http://127.0.0.1:%s"\n' "$name" "$prefix" "$PORT"
      printf 'strip_prefix = %s\nrequest = %s\nresponse = %s\ninject_body = true\n' "$strip" "$req" "$resp"
      printf 'policy = { mode = "%s", wait_ms = 30000, fail_mode = "open" }\nlabels = %s\n' "$policy" "$LABELS"
    done
  } >"$WORK/guard-$1.toml"
}

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
  IFS='|' read -r name _ _ _ _ path kind <<<"$r"
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

# Runs one instrumented guard binary through the training and stops it; its profile is written
# when it exits normally (SIGTERM: graceful shutdown).
train() { # binary stage
  write_config "$2"
  "$1" serve --config "$WORK/guard-$2.toml" \
    --listen "127.0.0.1:$((PORT + 1))" --ops-listen "127.0.0.1:$((PORT + 2))" 2>"$WORK/guard-$2.log" &
  local pid=$!
  PIDS+=($pid)
  wait_port "$((PORT + 1))"
  local guard=http://127.0.0.1:$((PORT + 1)) r name path kind i
  # Misses first (each image scored once by the engine), then load over hits.
  for r in "${ROUTES[@]}"; do
    IFS='|' read -r _ _ _ _ _ path kind <<<"$r"
    for i in "${!IMAGES[@]}"; do
      curl -s -o /dev/null --max-time 120 -X POST --data-binary "@$WORK/bodies/$kind-$i" \
        -H "Content-Type: $(content_type "$kind")" "$guard$path" || true
    done
  done
  # Bad input: not an image, a truncated PNG, invalid JSON, a forged header, an unknown route.
  curl -s -o /dev/null --max-time 10 -X POST --data 'not an image' "$guard/flag/predictions/m" || true
  head -c 100 "${IMAGES[0]}" | curl -s -o /dev/null --max-time 10 -X POST --data-binary @- \
    -H 'Content-Type: image/png' "$guard/flag/predictions/m" || true
  curl -s -o /dev/null --max-time 10 -X POST --data '{"instances": [' -H 'Content-Type: application/json' \
    "$guard/v1/models/fashion:predict" || true
  curl -s -o /dev/null --max-time 10 -X POST --data-binary "@${IMAGES[0]}" -H 'diffguard-verdict: ok' \
    "$guard/flag/predictions/m" || true
  curl -s -o /dev/null --max-time 10 "$guard/nowhere" || true
  curl -s -o /dev/null --max-time 10 "http://127.0.0.1:$((PORT + 2))/metrics" || true

  for r in "${ROUTES[@]}"; do
    IFS='|' read -r name _ _ _ _ path _ <<<"$r"
    log "training on route $name ($path) for ${TRAIN_SECS}s"
    timeout $((TRAIN_SECS + 30)) wrk -t2 -c16 -d"${TRAIN_SECS}s" -s "$WORK/$name.lua" "$guard$path" \
      | grep -E 'Requests/sec|Non-2xx' >&2 || true
  done
  kill -TERM "$pid"
  wait "$pid" || die "the $2 guard failed: $(tail -3 "$WORK/guard-$2.log")"
}

if [ -z "$PROFILE" ]; then
  train "$GEN_BIN" pgo
  ls "$RAW"/*.profraw >/dev/null 2>&1 || die "the instrumented guard wrote no profile"
  "$PROFDATA" merge -o "$BASE/merged.profdata" "$RAW"/*.profraw
  # Cargo does not watch the profile file, only RUSTFLAGS: a path named by the profile's hash
  # makes a new profile rebuild everything, and an unchanged one nothing.
  PROFILE=$BASE/merged-$(sha256sum "$BASE/merged.profdata" | cut -c1-16).profdata
  mv "$BASE/merged.profdata" "$PROFILE"
fi
log "profile: $PROFILE ($(du -h "$PROFILE" | cut -f1))"

build use "-Cprofile-use=$PROFILE"
mkdir -p "$(dirname "$OUT")"
cp "$BASE/target-use/$TRIPLE/dist/diffguard" "$OUT"
log "wrote $OUT"
