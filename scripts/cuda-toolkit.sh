#!/usr/bin/env bash
# A CUDA build toolchain from PyPI, for machines without NVIDIA's installer (CI images, this
# project's build machines): nvcc, its headers and the libraries `--features cuda` links against.
#
#   scripts/cuda-toolkit.sh [DIR] [CUDA_MAJOR_MINOR]     # default /opt/cuda-pypi, 13.0
#   eval "$(scripts/cuda-toolkit.sh --env DIR)"          # the variables for cargo
#   cargo build --release --features cuda                # then runs where a driver ≥ that CUDA is
#
# Match CUDA_MAJOR_MINOR to the oldest driver the binary must run on (`nvidia-smi` prints the
# CUDA version its driver supports): candle's kernels are compiled to PTX, and a driver refuses
# PTX from a newer toolkit. The build links dynamically, so the machine that runs it needs the
# driver (libcuda.so.1) and the CUDA libraries (cuBLAS, cuRAND, NVRTC, cudart) of the same major
# version on its library path — e.g. the `nvidia-*` pip packages PyTorch installs.
#
# libcuda.so belongs to the driver, which no package here ships; the build machine gets a stub
# with the driver API's symbol names, only for the linker. At run time the real one is loaded.
set -euo pipefail

env_only=0
if [ "${1:-}" = "--env" ]; then env_only=1; shift; fi
DIR=${1:-/opt/cuda-pypi}
VER=${2:-13.0}

if [ "$env_only" = 1 ]; then
  echo "export PATH=$DIR/bin:\$PATH CUDA_ROOT=$DIR CUDA_HOME=$DIR CUDA_PATH=$DIR"
  echo "export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}  # no GPU here to ask: 90 = Hopper"
  exit 0
fi

major=${VER%%.*}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "cuda-toolkit: downloading CUDA $VER wheels from PyPI" >&2
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux2010_x86_64 -d "$work/whl" \
  "nvidia-cuda-nvcc==$VER.*" "nvidia-cuda-runtime==$VER.*" "nvidia-cuda-crt==$VER.*" \
  "nvidia-nvvm==$VER.*" "nvidia-cuda-cccl==$VER.*" "nvidia-cublas==$VER.*" \
  "nvidia-cuda-nvrtc==$VER.*" nvidia-curand
for w in "$work"/whl/*.whl; do
  python3 -m zipfile -e "$w" "$work/unz"
done
mkdir -p "$DIR"
cp -a "$work/unz/nvidia/cu$major/." "$DIR/"
chmod +x "$DIR"/bin/* "$DIR"/nvvm/bin/*

# Unversioned names for the linker (`-lcublas` …).
cd "$DIR/lib"
for so in libcublas.so.* libcublasLt.so.* libcurand.so.* libnvrtc.so.* libcudart.so.*; do
  case "$so" in *alt*) continue ;; esac
  ln -sf "$so" "${so%%.so*}.so"
done
mkdir -p stubs
grep -ohE '\bcu[A-Z][A-Za-z0-9_]*' "$DIR/include/cuda.h" | sort -u |
  awk '{ print "void " $1 "(void) {}" }' > "$work/cuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o stubs/libcuda.so "$work/cuda_stub.c"
ln -sf stubs/libcuda.so libcuda.so
"$DIR/bin/nvcc" --version | tail -n 2 >&2
echo "cuda-toolkit: ready in $DIR; now: eval \"\$($0 --env $DIR)\"" >&2
