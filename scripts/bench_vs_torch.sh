#!/usr/bin/env bash
# Same-run comparison of the engine's whole-network CPU speed with PyTorch (issues 3 and 4).
#
#   scripts/bench_vs_torch.sh [--what networks|ops|all] [--reps-scale F] [--nets a,b]
#                             [--threads 1,2] [--out PATH] [--ops-out PATH]
#
# Builds crates/engine/examples/bench_networks (release), then runs every case (network x threads
# x mode) first with the engine, then with scripts/bench_torch.py, alternating case by case so
# that a change of machine load hits both sides alike. Writes the merged table, with
# ratio = ours / torch (below 1 = we are faster), to crates/engine/benches/bench_vs_torch.md.
# `--what ops` (or all) also runs examples/bench_ops (engine vs candle per op) and the same ops in
# PyTorch (`bench_torch.py --ops`) and writes crates/engine/benches/bench_vs_torch_ops.md, to see
# which op holds a network back.
#
# PyTorch is large and stays out of CI: point TORCH_PY at a venv python with torch, numpy and
# safetensors (default /work/venv-torch/bin/python). CARGO_TARGET_DIR is honoured. The run takes
# ~10-20 min on 2 busy cores; BENCH_NICE (default 10) is the niceness of the benchmark processes.
# On a machine shared with other work, PyTorch's OpenMP threads spin at every barrier while a
# sibling is descheduled, which multiplies its 2-thread CPU time; `OMP_WAIT_POLICY=PASSIVE` in the
# environment (recorded in the output) makes them sleep instead.
set -euo pipefail

cd "$(dirname "$0")/.."
TORCH_PY=${TORCH_PY:-/work/venv-torch/bin/python}
NICE=${BENCH_NICE:-10}
REPS=1
NETS=unet-stack,pixel-ddpm,resnet50,adm64,vgg16,adm256,ldm64
THREADS=1,2
OUT=crates/engine/benches/bench_vs_torch.md
OPS_OUT=crates/engine/benches/bench_vs_torch_ops.md
WHAT=networks
while [ $# -gt 0 ]; do
  case "$1" in
    --reps-scale) REPS=$2; shift 2 ;;
    --nets) NETS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --ops-out) OPS_OUT=$2; shift 2 ;;
    --what) WHAT=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

"$TORCH_PY" -c 'import torch' || { echo "no torch in $TORCH_PY (set TORCH_PY)" >&2; exit 1; }
# --workspace: the features the whole workspace unifies to, so the workspace's release build is reused.
cargo build --release -q --workspace --example bench_networks --example bench_ops
TARGET=${CARGO_TARGET_DIR:-target}
BIN=$TARGET/release/examples/bench_networks
export CPU_MODEL=$(lscpu | sed -n 's/^Model name: *//p' | head -n 1)
export NPROC=$(nproc)
export COMMIT=$(git rev-parse --short HEAD)

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ "$WHAT" = ops ] || [ "$WHAT" = all ]; then
  OPS_BEFORE=$(uptime)
  nice -n "$NICE" "$TARGET/release/examples/bench_ops" | tee "$WORK/ops_ours.md"
  nice -n "$NICE" "$TORCH_PY" scripts/bench_torch.py --ops --threads "$THREADS" \
    | tee "$WORK/ops_torch.jsonl"
  OPS_AFTER=$(uptime)
  export OPS_OURS=$WORK/ops_ours.md OPS_TORCH=$WORK/ops_torch.jsonl OPS_OUT OPS_BEFORE OPS_AFTER
  "$TORCH_PY" scripts/bench_vs_torch_ops.py
fi
[ "$WHAT" = ops ] && exit 0
OURS=$WORK/ours.jsonl
THEIRS=$WORK/torch.jsonl
LOAD_BEFORE=$(uptime)
START=$(date +%s)
for net in ${NETS//,/ }; do
  for thr in ${THREADS//,/ }; do
    for mode in fwd fwdbwd; do
      # Forward only: DISTS' VGG, and the paper-resolution UNets (no gradient flows through them).
      case "$net" in vgg16 | adm256 | ldm64) [ "$mode" = fwdbwd ] && continue ;; esac
      nice -n "$NICE" "$BIN" --nets "$net" --threads "$thr" --modes "$mode" \
        --reps-scale "$REPS" --jsonl "$OURS" | tail -n 1
      nice -n "$NICE" "$TORCH_PY" scripts/bench_torch.py --nets "$net" --threads "$thr" \
        --modes "$mode" --reps-scale "$REPS" --jsonl "$THEIRS" | tail -n 1
    done
  done
done
LOAD_AFTER=$(uptime)
MINUTES=$(( ($(date +%s) - START + 59) / 60 ))

export OURS THEIRS OUT REPS LOAD_BEFORE LOAD_AFTER MINUTES
"$TORCH_PY" - <<'EOF'
import json, os

def load(path):
    rows = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            rows[(r["net"], r["mode"], r["threads"])] = r
    return rows

ours, theirs = load(os.environ["OURS"]), load(os.environ["THEIRS"])
first = next(iter(theirs.values()))
torch_version = first["torch"]
omp = first.get("omp_wait_policy", "default")
target = {"fwd": 1.2, "fwdbwd": 1.5}

def ratio(a, b):
    return "n/a" if a is None or b is None or b <= 0 else f"{a / b:.2f}×"

lines = [
    "| network | mode | thr | ours wall | torch wall | wall ratio | ours cpu | torch cpu | "
    "cpu ratio | target | ours peak | torch peak | peak ratio |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]
for key, o in ours.items():
    t = theirs.get(key)
    if t is None:
        continue
    net, mode, thr = key
    cpu_ratio = o["cpu_ms"] / t["cpu_ms"]
    verdict = f"≤{target[mode]}× " + ("met" if cpu_ratio <= target[mode] else "**missed**")
    peak = lambda r: "n/a" if r["peak_delta_mib"] is None else f"{r['peak_delta_mib']:.0f}"
    lines.append(
        f"| {o['title']} | {mode} | {thr} | {o['wall_ms']:.1f} | {t['wall_ms']:.1f} | "
        f"{ratio(o['wall_ms'], t['wall_ms'])} | {o['cpu_ms']:.1f} | {t['cpu_ms']:.1f} | "
        f"{cpu_ratio:.2f}× | {verdict} | {peak(o)} | {peak(t)} | "
        f"{ratio(o['peak_delta_mib'], t['peak_delta_mib'])} |"
    )
table = "\n".join(lines)

env = os.environ
doc = f"""# Engine vs PyTorch, whole networks on CPU (release, f32)

Generated by `scripts/bench_vs_torch.sh --reps-scale {env['REPS']}` at commit {env['COMMIT']}
(`crates/engine/examples/bench_networks.rs` against `scripts/bench_torch.py`, PyTorch
{torch_version} CPU from PyPI, `OMP_WAIT_POLICY` {omp}), {env['MINUTES']} min.

Machine: {env['NPROC']} vCPU, {env['CPU_MODEL']}. Load before: `{env['LOAD_BEFORE'].strip()}`;
after: `{env['LOAD_AFTER'].strip()}`.

How to read it: every case is a fresh process (threads fixed per process), ours then PyTorch's,
alternating case by case. wall / cpu = median ms per call after one warm-up (cpu = process CPU
time over all threads, the steadier number on a shared machine); ratio = ours / torch, **below 1
means the engine is faster**. "target" applies the issue-4 targets (forward ≤ 1.2×,
forward+backward ≤ 1.5× PyTorch) to the CPU ratio. peak = RSS high-water mark above the
post-build baseline (weights and input excluded; both sides trim the heap before the baseline),
MiB. fwd = no autograd graph (`torch.no_grad()`; no `Var` in candle); fwdbwd = gradient w.r.t.
the input only, weights frozen, backward seeded with ones. Weights are random (He-scaled,
deterministic), the same rule on both sides; values do not change the work.

{table}
"""
with open(env["OUT"], "w") as f:
    f.write(doc)
print(doc)
EOF
