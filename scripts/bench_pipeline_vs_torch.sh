#!/usr/bin/env bash
# Same-run comparison of the whole DiffGuard pipeline with a PyTorch reference (issue 2).
#
#   scripts/bench_pipeline_vs_torch.sh [--images 64] [--batch 32] [--reps 3] [--threads 1]
#                                      [--variants recipe,aes,clean-grad,aes+clean-grad] [--out PATH]
#
# Per (variant, threads) case, alternating so that a change of machine load hits all sides alike:
# the engine (crates/engine/examples/bench_pipeline, release), then scripts/torch_pipeline.py in
# the official code's structure ("reference": per-image denoising under adaptive early stop, a
# second UNet call for Clean Grad's x̂0) and in the engine's structure ("batched"). Writes the
# table (speed-ups, NFE, peak memory, score agreement) to crates/engine/benches/
# bench_pipeline_vs_torch.md. PyTorch stays out of CI: TORCH_PY is a venv python with torch,
# numpy and safetensors (default /work/venv-torch/bin/python; see scripts/bench_vs_torch.sh).
# Needs the data of scripts/fetch-data.sh ($DIFFGUARD_DATA or data/). CARGO_TARGET_DIR is honoured.
set -euo pipefail

cd "$(dirname "$0")/.."
TORCH_PY=${TORCH_PY:-/work/venv-torch/bin/python}
NICE=${BENCH_NICE:-10}
IMAGES=64
BATCH=32
REPS=3
THREADS=1
VARIANTS=recipe,aes,clean-grad,aes+clean-grad
OUT=crates/engine/benches/bench_pipeline_vs_torch.md
while [ $# -gt 0 ]; do
  case "$1" in
    --images) IMAGES=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --variants) VARIANTS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

"$TORCH_PY" -c 'import torch' || { echo "no torch in $TORCH_PY (set TORCH_PY)" >&2; exit 1; }
# --workspace: the features the whole workspace unifies to, so the workspace's release build is reused.
cargo build --release -q --workspace --example bench_pipeline
BIN=${CARGO_TARGET_DIR:-target}/release/examples/bench_pipeline
DATA=${DIFFGUARD_DATA:-data}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
BEFORE=$(uptime)
for v in ${VARIANTS//,/ }; do
  for thr in ${THREADS//,/ }; do
    nice -n "$NICE" "$BIN" --bundle models/fashion-mnist --variants "$v" --threads "$thr" --images "$IMAGES" --batch "$BATCH" \
      --reps "$REPS" --jsonl "$WORK/ours.jsonl" | tail -n 1
    line=$(( $(wc -l < "$WORK/ours.jsonl") - 1 ))
    for structure in reference batched; do
      OMP_WAIT_POLICY=PASSIVE nice -n "$NICE" "$TORCH_PY" scripts/torch_pipeline.py run \
        --case "$WORK/ours.jsonl" --line "$line" --structure "$structure" --data "$DATA" \
        >> "$WORK/torch.jsonl"
      tail -n 1 "$WORK/torch.jsonl" | "$TORCH_PY" -c \
        'import json,sys; r=json.load(sys.stdin); print("  torch %s: %.1f ms/img" % (r["structure"], r["cpu_ms_per_image"]))'
    done
  done
done
AFTER=$(uptime)

{
  echo "# DiffGuard pipeline: engine vs PyTorch, same run"
  echo
  echo "\`scripts/bench_pipeline_vs_torch.sh --images $IMAGES --batch $BATCH --reps $REPS --threads $THREADS --variants $VARIANTS\`"
  echo "at commit $(git rev-parse --short HEAD), $(date -u +%Y-%m-%d), $(lscpu | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) cores,"
  echo "$("$TORCH_PY" -c 'import torch; print("torch", torch.__version__)'). Load before: \`$BEFORE\`; after: \`$AFTER\`."
  echo
  echo "Project bundle \`models/fashion-mnist\` (pixel DDPM 1.37M params + small ResNet), the first"
  echo "$IMAGES Fashion-MNIST test images, scored against the predicted label, $BATCH per call."
  echo "ms/img = median over passes of process CPU time per image (all threads). Speed-up = torch"
  echo "ms / engine ms (above 1 = the engine is faster). NFE = network rows per image. The last"
  echo "column compares the engine's and the reference's per-image results: largest score"
  echo "difference over the standard deviation of the scores, images whose early-stop step k*"
  echo "differs, images whose predicted label differs."
  echo
} > "$OUT"
"$TORCH_PY" scripts/torch_pipeline.py table --ours "$WORK/ours.jsonl" --torch "$WORK/torch.jsonl" --out "$OUT"
cp "$WORK/ours.jsonl" "${OUT%.md}.ours.jsonl"
cp "$WORK/torch.jsonl" "${OUT%.md}.torch.jsonl"
echo "wrote $OUT"
