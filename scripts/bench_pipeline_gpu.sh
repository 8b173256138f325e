#!/usr/bin/env bash
# Same-run comparison of the whole DiffGuard pipeline on an NVIDIA GPU: the engine's
# `bench_pipeline --device cuda` against scripts/torch_pipeline.py on the same GPU (strict f32),
# in the official code's structure and in the engine's. How the numbers in
# crates/engine/benches/bench_pipeline_gpu.md were made.
#
#   scripts/bench_pipeline_gpu.sh [--bench PATH] [--images 64] [--batch 32] [--reps 3] [--out DIR]
#
# --bench: a `--features cuda` build of the bench_pipeline example (default
# target/release/examples/bench_pipeline; see scripts/cuda-toolkit.sh for building one without a
# CUDA installation). Python with torch (CUDA), numpy and safetensors as `python3`, or TORCH_PY.
# Needs the data of scripts/fetch-data.sh ($DIFFGUARD_DATA or data/). Writes ours.jsonl,
# torch.jsonl and table.md into --out (default a new temporary folder) and prints the table.
set -euo pipefail

cd "$(dirname "$0")/.."
TORCH_PY=${TORCH_PY:-python3}
BENCH=target/release/examples/bench_pipeline
IMAGES=64
BATCH=32
REPS=3
OUT=
VARIANTS=recipe,aes,clean-grad,aes+clean-grad
while [ $# -gt 0 ]; do
  case "$1" in
    --bench) BENCH=$2; shift 2 ;;
    --images) IMAGES=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
DATA=${DIFFGUARD_DATA:-data}

"$BENCH" --device cuda --images "$IMAGES" --batch "$BATCH" --reps "$REPS" --variants "$VARIANTS" \
  --bundle models/fashion-mnist --jsonl "$OUT/ours.jsonl"
n=$(wc -l < "$OUT/ours.jsonl")
for ((i = 0; i < n; i++)); do
  for s in reference batched; do
    "$TORCH_PY" scripts/torch_pipeline.py run --case "$OUT/ours.jsonl" --line $i --structure $s \
      --device cuda --data "$DATA" >> "$OUT/torch.jsonl"
  done
done
"$TORCH_PY" scripts/torch_pipeline.py table --ours "$OUT/ours.jsonl" --torch "$OUT/torch.jsonl" \
  --clock wall --out "$OUT/table.md"
echo "wrote $OUT/table.md"
