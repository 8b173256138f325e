#!/usr/bin/env bash
# Issue #5 benchmark: the guard's cache-hit path (policy `flag`, verdict cached) against nginx as a
# plain reverse proxy to the same upstream, on loopback, load from wrk, bounded in time.
#
#   scripts/bench_proxy.sh                      # both upstreams, 3 reps x 10 s per target
#   UPSTREAMS=static DURATION=5 REPS=1 scripts/bench_proxy.sh
#   MODE=instructions scripts/bench_proxy.sh    # instructions per request under callgrind
#   DETECTOR=logits UPSTREAMS=static scripts/bench_proxy.sh   # no model loaded (RSS target)
#   MODE=latency RATE=2000 scripts/bench_proxy.sh               # open-loop, fixed request rate
#   scripts/pgo.sh && GUARD_BIN=target/pgo/diffguard scripts/bench_proxy.sh   # profile-guided guard
#   FLOOR=tokio scripts/bench_proxy.sh          # the floor without an HTTP library (see below)
#
# MODE=latency replaces wrk (closed loop: 32 connections each waiting for its answer, so it
# measures queueing at saturation) by examples/loadgen.rs at a fixed request rate below every
# target's capacity, with latency counted per request sent on schedule. Its added p50/p99 are
# what a client sees at that load; the table has the same columns (req/s is then just RATE).
#
# MODE=instructions counts what each proxy executes per request (valgrind's callgrind, static
# upstream): nginx, the guard on a cache hit (`flag`), the guard passing through (`off`: its
# forwarding layer with no guard work), and the floor (below). Counts do not depend on what else
# the machine runs, so they compare builds on a shared machine where req/s and CPU time drift by
# tens of percent. The same runs simulate the caches (callgrind --cache-sim, the host's cache
# sizes): L1 instruction and data misses per request say how much code and data a request drags
# through the core, which instruction counts alone do not (the process's own accesses only; the
# kernel's are not simulated).
#
# Upstreams (UPSTREAMS, space-separated):
#   static   nginx answering every POST with a fixed JSON (`return 200`): the cheapest upstream
#            there is, so whatever the proxies add is not hidden behind upstream CPU time.
#   example  the project's own example classifier (`examples/upstream.rs`: PNG decode +
#            nearest-centroid + JSON), the upstream the README and demo use.
# The static body is the example classifier's own answer for the benchmark image, so the guard
# reads the same label from both.
#
# Per upstream, four targets get the same load (same body, connections, threads, duration):
# direct upstream, nginx reverse proxy, guard, and a floor, a pass-through proxy on the guard's
# runtime layout with no guard work, chosen by FLOOR:
#   hyper   examples/hyper_floor.rs: hyper + hyper-util alone (the floor of the guard's HTTP stack)
#   tokio   examples/tokio_floor.rs: bytes relayed as framed by httparse, no HTTP library (the
#           floor of any Tokio proxy: what the runtime and the kernel cost per request)
# Order rotates each rep; medians are reported.
# Every process started here is killed on exit. Installs nginx-light / wrk only when missing.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

MODE=${MODE:-wall}
# diffguard: the bundled models (benches/guard.toml); logits: the model-free detector
# (benches/guard-logits.toml), for which the static upstream answers a full score vector.
DETECTOR=${DETECTOR:-diffguard}
case $DETECTOR in
  diffguard) GUARD_TOML=benches/guard.toml ;;
  logits) GUARD_TOML=benches/guard-logits.toml ;;
  *) echo "unknown DETECTOR=$DETECTOR" >&2; exit 1 ;;
esac
UPSTREAMS=${UPSTREAMS:-"static example"}
DURATION=${DURATION:-10}          # seconds per measured run
WARMUP=${WARMUP:-2}               # seconds of unmeasured load per target before rep 1
REPS=${REPS:-3}
THREADS=${THREADS:-2}
CONNS=${CONNS:-32}
IMAGE=${IMAGE:-examples/assets/images/fashion-0018-bag.png}
BASE_PORT=${BASE_PORT:-18480}
P_STATIC=$((BASE_PORT + 1))
P_EXAMPLE=$((BASE_PORT + 2))
P_NGINX=$((BASE_PORT + 3))
P_GUARD=$((BASE_PORT + 4))
P_OPS=$((BASE_PORT + 5))
P_FLOOR=$((BASE_PORT + 6))
PATH_Q=/predictions/fashion
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
FLOOR=${FLOOR:-hyper}
case $FLOOR in
  hyper | tokio) ;;
  *) echo "unknown FLOOR=$FLOOR (hyper or tokio)" >&2; exit 1 ;;
esac
# The guard and the floor as shipped: the `dist` profile (fat LTO), as nginx is built -O2.
GUARD_BIN=${GUARD_BIN:-$TARGET_DIR/dist/diffguard}
UPSTREAM_BIN=${UPSTREAM_BIN:-$TARGET_DIR/release/examples/upstream}
LOADGEN_BIN=${LOADGEN_BIN:-$TARGET_DIR/release/examples/loadgen}
FLOOR_BIN=${FLOOR_BIN:-$TARGET_DIR/dist/examples/${FLOOR}_floor}
RATE=${RATE:-2000}

log() { printf '[bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- tools ----------------------------------------------------------------------------------
need_pkg() { # command package...
  local cmd=$1; shift
  command -v "$cmd" >/dev/null && return 0
  [ "$(id -u)" = 0 ] || die "$cmd missing and not root; install one of: $*"
  # A fresh machine's package lists may be empty or stale.
  apt-get update -q >/dev/null 2>&1 || true
  for p in "$@"; do
    # grep without -q reads to the end: with -q it exits at the first match and, under
    # pipefail, apt-cache's SIGPIPE made the test fail, so nothing was ever installed.
    if apt-cache policy "$p" 2>/dev/null | grep 'Candidate: [0-9]' >/dev/null; then
      log "installing $p"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$p" >/dev/null
      command -v "$cmd" >/dev/null && return 0
    fi
  done
  die "could not install $cmd"
}
need_pkg nginx nginx-light nginx
need_pkg wrk wrk
[ "$MODE" = instructions ] && need_pkg valgrind valgrind
command -v curl >/dev/null || die "curl missing"
if [ ! -x "$GUARD_BIN" ] || [ ! -x "$FLOOR_BIN" ]; then
  log "building the guard and the $FLOOR floor (profile dist) into $TARGET_DIR"
  cargo build --profile dist -q -p diffguard --bin diffguard --example "${FLOOR}_floor"
fi
if [ ! -x "$UPSTREAM_BIN" ] || [ ! -x "$LOADGEN_BIN" ]; then
  log "building the example upstream and the load generator (release) into $TARGET_DIR"
  cargo build --release -q -p diffguard --example upstream --example loadgen
fi
[ -f "$IMAGE" ] || die "no image $IMAGE"

for p in $P_STATIC $P_EXAMPLE $P_NGINX $P_GUARD $P_OPS $P_FLOOR; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then die "port $p busy (set BASE_PORT)"; fi
done

# --- processes --------------------------------------------------------------------------------
WORK=$(mktemp -d /tmp/bench_proxy.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 0.5
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  [ -n "${KEEP_WORK:-}" ] && log "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

wait_port() { # port what
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  die "$2 did not listen on $1"
}

# nginx config shared by both nginx instances: tuned the way a reverse proxy is deployed
# (keep-alive both sides, no access log: the guard writes none either).
nginx_conf() { # name server-block [main-directives [launcher...]]
  local dir=$WORK/$1
  mkdir -p "$dir/logs"
  cat >"$dir/nginx.conf" <<EOF
$( [ "$(id -u)" = 0 ] && echo "user root;" )
${3:-}
worker_processes auto;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/body;
  proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi;
  uwsgi_temp_path $dir/uwsgi;
  scgi_temp_path $dir/scgi;
  client_body_buffer_size 64k;
  client_max_body_size 8m;
  keepalive_requests 1000000;
  $2
}
EOF
  "${@:4}" nginx -p "$dir" -e "$dir/logs/error.log" -c "$dir/nginx.conf" -g 'daemon off;' &
  PIDS+=($!)
}

# nginx as a plain reverse proxy on $P_NGINX to an upstream port, keep-alive both sides.
nginx_proxy() { # name upstream-port [main-directives [launcher...]]
  nginx_conf "$1" "upstream backend { server 127.0.0.1:$2; keepalive 64; }
  server {
    listen 127.0.0.1:$P_NGINX;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }" "${@:3}"
}

"$UPSTREAM_BIN" "127.0.0.1:$P_EXAMPLE" 2>"$WORK/example.log" &
EXAMPLE_PID=$!
PIDS+=($EXAMPLE_PID)
wait_port "$P_EXAMPLE" "example upstream"
ANSWER=$(curl -sf -X POST --data-binary "@$IMAGE" -H 'Content-Type: image/png' \
  "http://127.0.0.1:$P_EXAMPLE$PATH_Q")
[[ $ANSWER == \{* && $ANSWER != *"'"* ]] || die "example upstream answered: $ANSWER"
log "example upstream answer: $ANSWER"
if [ "$DETECTOR" = logits ]; then
  [ "$UPSTREAMS" = static ] || die "DETECTOR=logits needs UPSTREAMS=static (the example answers no score vector)"
  # Logits whose argmax is the example's label for the image (Bag, id 8).
  ANSWER='{"scores": [-1.2, -3.0, 0.4, -0.8, -2.1, 1.0, -0.5, 0.2, 7.5, -1.9]}'
fi

nginx_conf static "server {
    listen 127.0.0.1:$P_STATIC;
    location / { default_type application/json; return 200 '$ANSWER'; }
  }"
STATIC_PID=${PIDS[-1]}
wait_port "$P_STATIC" "static nginx"

# --- load -------------------------------------------------------------------------------------
cat >"$WORK/post.lua" <<EOF
local f = assert(io.open("$ROOT/$IMAGE", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "image/png"
function done(s, lat, req)
  local e = s.errors
  io.write(string.format("RESULT rps=%.1f p50_us=%d p99_us=%d requests=%d errors=%d\n",
    s.requests / (s.duration / 1e6), lat:percentile(50), lat:percentile(99), s.requests,
    e.connect + e.read + e.write + e.status + e.timeout))
end
EOF

# One bounded load run; prints "rps p50_us p99_us requests errors".
load() { # url seconds
  if [ "$MODE" = latency ]; then
    local j
    j=$(timeout $(($2 + 60)) "$LOADGEN_BIN" --url "$1" --body "$ROOT/$IMAGE" \
      --content-type image/png --rate "$RATE" --duration "$2" --warmup 0)
    jget() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p" <<<"$j"; }
    log "loadgen: $j"
    echo "$(awk -v n="$(jget ok)" -v d="$2" 'BEGIN {print n / d}') $(jget p50_us) $(jget p99_us) $(jget ok) $(jget errors)"
    return
  fi
  timeout $(($2 + 30)) wrk -t"$THREADS" -c"$CONNS" -d"$2s" --timeout 5s -s "$WORK/post.lua" "$1" \
    | sed -n 's/^RESULT rps=\([^ ]*\) p50_us=\([^ ]*\) p99_us=\([^ ]*\) requests=\([^ ]*\) errors=\(.*\)$/\1 \2 \3 \4 \5/p'
}

rss() { # pid -> "VmRSS_kB VmHWM_kB"
  awk '/^VmRSS/{r=$2} /^VmHWM/{h=$2} END{print r, h}' "/proc/$1/status"
}
nginx_rss() { # master pid -> summed VmRSS kB of master + workers
  local total=0 p
  for p in $1 $(pgrep -P "$1"); do total=$((total + $(awk '/^VmRSS/{print $2}' "/proc/$p/status"))); done
  echo "$total"
}
metric() { # name-with-labels -> value from the guard's /metrics
  curl -sf "http://127.0.0.1:$P_OPS/metrics" | awk -v m="$1" 'index($0, m) == 1 {print $NF}' | head -1
}
cpu_ticks() { # pids... -> utime+stime summed, in clock ticks (children of each pid included)
  local total=0 p
  for p in "$@"; do
    for q in $p $(pgrep -P "$p"); do total=$((total + $(awk '{print $14 + $15}' "/proc/$q/stat"))); done
  done
  echo "$total"
}
TCK=$(getconf CLK_TCK)
median() { sort -g | awk '{a[NR]=$1} END{print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# --- MODE=instructions -------------------------------------------------------------------------
# One bounded wrk run against a process under callgrind; prints "requests instructions
# I1-misses D1-misses" (D1: read and write misses).
count_instructions() { # pid url
  load "$2" "$WARMUP" >/dev/null
  callgrind_control -z "$1" >/dev/null 2>&1
  local r n f
  r=$(load "$2" "$DURATION")
  callgrind_control -d "$1" >/dev/null 2>&1
  n=$(cut -d' ' -f4 <<<"$r")
  f=$(ls -t "$WORK"/cg."$1".* | head -1)
  # Totals by event name: the column order is the one "Events shown:" lists.
  echo "$n $(callgrind_annotate "$f" 2>/dev/null | awk '
    /^Events shown:/ {for (i = 3; i <= NF; i++) col[$i] = i - 2}
    /PROGRAM TOTALS/ {
      gsub(",", ""); gsub(/\([^)]*\)/, ""); split($0, v, " +")
      print v[col["Ir"]], v[col["I1mr"]], v[col["D1mr"]] + v[col["D1mw"]]
    }')"
}

if [ "$MODE" = instructions ]; then
  CG=(valgrind --tool=callgrind --cache-sim=yes "--callgrind-out-file=$WORK/cg.%p")
  UP_URL=http://127.0.0.1:$P_STATIC
  nginx_proxy cg-nginx "$P_STATIC" "master_process off;" "${CG[@]}"
  NGINX_PID=${PIDS[-1]}
  # The same guard serves the cache-hit route and a pass-through route (`off`) to one upstream.
  sed "s#@UPSTREAM@#$UP_URL#" "$GUARD_TOML" >"$WORK/guard-cg.toml"
  printf '\n[[routes]]\nname = "passthrough"\nprefix = "/passthrough/"\nupstream = "%s"\n%s\n' \
    "$UP_URL" 'request = { kind = "raw" }
response = { kind = "argmax", pointer = "/scores" }
policy = { mode = "off" }' >>"$WORK/guard-cg.toml"
  "${CG[@]}" "$GUARD_BIN" serve --config "$WORK/guard-cg.toml" --listen "127.0.0.1:$P_GUARD" \
    --ops-listen "127.0.0.1:$P_OPS" 2>"$WORK/guard-cg.log" &
  GUARD_PID=$!
  PIDS+=($GUARD_PID)
  "${CG[@]}" "$FLOOR_BIN" --listen "127.0.0.1:$P_FLOOR" --upstream "$UP_URL" \
    2>"$WORK/floor-cg.log" &
  FLOOR_PID=$!
  PIDS+=($FLOOR_PID)
  wait_port "$P_NGINX" "nginx proxy (callgrind)"
  wait_port "$P_FLOOR" "$FLOOR floor (callgrind)"
  for _ in $(seq 1 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$P_GUARD") 2>/dev/null && break
    kill -0 "$GUARD_PID" 2>/dev/null || die "guard exited: $(grep -v '^==' "$WORK/guard-cg.log" | tail -3)"
    sleep 0.5
  done
  wait_port "$P_GUARD" "guard (callgrind)"
  # Under callgrind the first verdict takes the engine minutes, not seconds.
  for _ in $(seq 1 600); do
    curl -sf -D - -o /dev/null -X POST --data-binary "@$IMAGE" -H 'Content-Type: image/png' \
      "http://127.0.0.1:$P_GUARD$PATH_Q" | grep -qi '^diffguard-cache: hit' && break
    sleep 1
  done
  echo "INSTRUCTIONS (callgrind per request; wrk -t$THREADS -c$CONNS, ${DURATION}s per target)"
  echo "| path | requests | instructions / request | vs nginx | L1i misses / request | L1d misses / request |"
  echo "|---|---:|---:|---:|---:|---:|"
  base=""
  for t in nginx guard-hit guard-off floor; do
    case $t in
      nginx) r=$(count_instructions "$NGINX_PID" "http://127.0.0.1:$P_NGINX$PATH_Q") ;;
      floor) r=$(count_instructions "$FLOOR_PID" "http://127.0.0.1:$P_FLOOR$PATH_Q") ;;
      guard-hit) r=$(count_instructions "$GUARD_PID" "http://127.0.0.1:$P_GUARD$PATH_Q") ;;
      guard-off) r=$(count_instructions "$GUARD_PID" "http://127.0.0.1:$P_GUARD/passthrough$PATH_Q") ;;
    esac
    read -r n ir i1 d1 <<<"$r"
    per=$((ir / n))
    base=${base:-$per}
    awk -v t="${t/#floor/$FLOOR-floor}" -v n="$n" -v p="$per" -v b="$base" -v i="$i1" -v d="$d1" \
      'BEGIN {printf "| %s | %d | %d | %.2fx | %.0f | %.0f |\n", t, n, p, p / b, i / n, d / n}'
  done
  exit 0
fi

log "machine: nproc=$(nproc) $(uptime)"
echo "LOAD_BEFORE $(uptime)"

for up in $UPSTREAMS; do
  case $up in
    static) UP_PORT=$P_STATIC UP_PID=$STATIC_PID ;;
    example) UP_PORT=$P_EXAMPLE UP_PID=$EXAMPLE_PID ;;
    *) die "unknown upstream $up" ;;
  esac
  UP_URL=http://127.0.0.1:$UP_PORT

  nginx_proxy "proxy-$up" "$UP_PORT"
  NGINX_PID=${PIDS[-1]}
  wait_port "$P_NGINX" "nginx proxy"

  sed "s#@UPSTREAM@#$UP_URL#" "$GUARD_TOML" >"$WORK/guard-$up.toml"
  "$GUARD_BIN" serve --config "$WORK/guard-$up.toml" --listen "127.0.0.1:$P_GUARD" \
    --ops-listen "127.0.0.1:$P_OPS" 2>"$WORK/guard-$up.log" &
  GUARD_PID=$!
  PIDS+=($GUARD_PID)
  "$FLOOR_BIN" --listen "127.0.0.1:$P_FLOOR" --upstream "$UP_URL" 2>"$WORK/floor-$up.log" &
  FLOOR_PID=$!
  PIDS+=($FLOOR_PID)
  wait_port "$P_GUARD" "guard"
  wait_port "$P_FLOOR" "$FLOOR floor"

  # Warm the verdict cache: the first request is scored by the engine (CPU, may take seconds);
  # repeat until the guard answers from the cache.
  hdrs=""
  for _ in $(seq 1 180); do
    hdrs=$(curl -sf -D - -o /dev/null -X POST --data-binary "@$IMAGE" -H 'Content-Type: image/png' \
      "http://127.0.0.1:$P_GUARD$PATH_Q" | tr -d '\r')
    grep -qi '^diffguard-cache: hit' <<<"$hdrs" && break
    sleep 1
  done
  grep -qi '^diffguard-cache: hit' <<<"$hdrs" || die "verdict never cached; guard log: $(tail -5 "$WORK/guard-$up.log")"
  log "guard warm ($up): $(grep -i '^diffguard-' <<<"$hdrs" | tr '\n' ' ')"
  echo "GUARD_HEADERS $up $(grep -i '^diffguard-\(verdict\|cache\|label\|score\)' <<<"$hdrs" | tr '\n' ' ')"
  read -r rss0 hwm0 < <(rss "$GUARD_PID")
  hits0=$(metric 'diffguard_cache_lookups_total{tier="memory",result="hit"}'); hits0=${hits0:-0}

  declare -A URL=([direct]="$UP_URL$PATH_Q" [nginx]="http://127.0.0.1:$P_NGINX$PATH_Q"
                  [guard]="http://127.0.0.1:$P_GUARD$PATH_Q" [floor]="http://127.0.0.1:$P_FLOOR$PATH_Q")
  # CPU per request of the hop under test (the upstream itself for `direct`): on a shared machine
  # this is steadier than req/s, which depends on what else the cores are doing.
  declare -A HOP=([direct]="$UP_PID" [nginx]="$NGINX_PID" [guard]="$GUARD_PID" [floor]="$FLOOR_PID")
  for t in direct nginx guard floor; do load "${URL[$t]}" "$WARMUP" >/dev/null; done
  orders=("direct nginx guard floor" "nginx guard floor direct" "guard floor direct nginx"
          "floor direct nginx guard")
  : >"$WORK/runs-$up"
  for rep in $(seq 0 $((REPS - 1))); do
    for t in ${orders[$((rep % 4))]}; do
      c0=$(cpu_ticks ${HOP[$t]})
      r=$(load "${URL[$t]}" "$DURATION")
      c1=$(cpu_ticks ${HOP[$t]})
      [ -n "$r" ] || die "wrk gave no result for $t"
      r="$r $(awk -v c=$((c1 - c0)) -v n="$(cut -d' ' -f4 <<<"$r")" -v k="$TCK" 'BEGIN {printf "%.1f", c * 1e6 / k / n}')"
      echo "$t $r" >>"$WORK/runs-$up"
      echo "RUN $up rep=$((rep + 1)) $t $r"
      log "$up rep $((rep + 1)) $t: rps p50_us p99_us requests errors hop_cpu_us_per_req = $r"
    done
  done
  read -r rss1 hwm1 < <(rss "$GUARD_PID")
  nrss=$(nginx_rss "$NGINX_PID")
  hits1=$(metric 'diffguard_cache_lookups_total{tier="memory",result="hit"}')
  jobs=$(metric 'diffguard_jobs_total'); jobs=${jobs:-0}
  guard_reqs=$(awk '$1 == "guard" {s += $5} END {print s}' "$WORK/runs-$up")
  echo "RSS $up guard_idle_rss_kB=$rss0 guard_rss_kB=$rss1 guard_hwm_kB=$hwm1 nginx_rss_kB=$nrss"
  echo "HITS $up memory_hits_during_load=$((${hits1%.*} - ${hits0%.*})) measured_guard_requests=$guard_reqs engine_jobs=$jobs"

  for t in direct nginx guard floor; do
    for col in 2 3 4 6 7; do
      eval "M_${t}_$col=\$(awk -v t=$t -v c=$col '\$1 == t {print \$c}' \"$WORK/runs-$up\" | median)"
    done
  done
  echo "TABLE $up"
  echo "| path | req/s (median) | p50 ms | p99 ms | added p50 ms | added p99 ms | errors | hop CPU µs/req |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  for t in direct nginx guard floor; do
    eval "rps=\$M_${t}_2 p50=\$M_${t}_3 p99=\$M_${t}_4 err=\$M_${t}_6 cpu=\$M_${t}_7"
    awk -v t="${t/#floor/$FLOOR floor}" -v r="$rps" -v a="$p50" -v b="$p99" -v da="$M_direct_3" -v db="$M_direct_4" -v e="$err" -v cpu="$cpu" \
      'BEGIN {printf "| %s | %.0f | %.3f | %.3f | %s | %s | %s | %.1f |\n", t, r, a/1000, b/1000,
        (t == "direct") ? "-" : sprintf("%+.3f", (a-da)/1000), (t == "direct") ? "-" : sprintf("%+.3f", (b-db)/1000), e, cpu}'
  done
  awk -v g="$M_guard_2" -v n="$M_nginx_2" -v h="$M_floor_2" -v f="$FLOOR" \
    'BEGIN {printf "RATIO guard/nginx req/s = %.2f (%s floor/nginx = %.2f, guard/%s floor = %.2f)\n", g/n, f, h/n, f, g/h}'
  echo

  kill "$GUARD_PID" "$NGINX_PID" "$FLOOR_PID" 2>/dev/null || true
  wait "$GUARD_PID" "$NGINX_PID" "$FLOOR_PID" 2>/dev/null || true
  echo "GUARD_LOG_LINES $up $(wc -l <"$WORK/guard-$up.log")"
done

echo "LOAD_AFTER $(uptime)"
