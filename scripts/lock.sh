#!/usr/bin/env bash
# Regenerates the lock files under requirements/ from pyproject.toml (run it after changing any dependency):
#
#   make lock            (or: bash scripts/lock.sh)
#
# For CPython 3.11 on linux x86_64 (manylinux_2_28, what the bootstrap and the Docker images run), with the
# sha256 of every file, by `uv pip compile` (uv pinned below, installed into build/lock-tools):
#   requirements/dev.lock        base + [model] + [training] + [test]: what scripts/bootstrap.sh installs
#   requirements/model.lock      base + [model]: a CPU inference worker
#   requirements/gpu.lock        base + [model] + [gpu]: the GPU inference worker image (deploy/docker/Dockerfile.cuda)
#   requirements/base.lock       base only: node, API and delivery image, no torch (deploy/docker/Dockerfile.cpu)
#   requirements/torch-cpu.lock  torch 2.13.0, CPU build, installed first and on its own
# model.lock, gpu.lock and base.lock are compiled with dev.lock as constraints, so one version of each package is used
# everywhere. torch itself is left out of the other locks (its CPU and CUDA builds are different files); its
# own dependencies are in them. The CPU wheel is found where pip finds it on this machine (pip's find-links,
# or TORCH_WHEELS=DIR); no path of this machine is written into the lock files.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
TORCH="torch==2.13.0+cpu"
PYTHON="${PYTHON:-python3.11}"
tools=build/lock-tools

log() { printf '[lock] %s\n' "$*"; }

if [ "$("$tools/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  log "installing uv $UV_VERSION into $tools"
  "$PYTHON" -m venv "$tools"
  "$tools/bin/python" -m pip install -q "uv==$UV_VERSION"
fi
uv="$tools/bin/uv"

wheels="${TORCH_WHEELS:-$("$PYTHON" -m pip config get global.find-links 2>/dev/null || true)}"
find_links=()
for dir in $wheels; do find_links+=(--find-links "$dir"); done

compile() {
  local out=$1; shift
  log "writing $out"
  "$uv" pip compile --quiet pyproject.toml "$@" \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --generate-hashes --no-emit-package torch --custom-compile-command "make lock" \
    "${find_links[@]}" --output-file "$out"
}

mkdir -p requirements build
# uv records no hash for a find-links file: hash the CPU wheel pip will install (the same file) ourselves.
wheel=""
for dir in $wheels; do
  for candidate in "$dir"/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl; do
    [ -f "$candidate" ] && wheel=$candidate
  done
done
[ -n "$wheel" ] || { log "the torch 2.13.0 CPU wheel is not in pip's find-links (set TORCH_WHEELS=DIR)"; exit 1; }
{
  echo "# torch 2.13.0, CPU build, for CPython 3.11 linux x86_64; written by: make lock"
  echo "torch==2.13.0+cpu \\"
  echo "    --hash=sha256:$(sha256sum "$wheel" | cut -d' ' -f1)"
} > requirements/torch-cpu.lock
echo "$TORCH" > build/torch-constraint.txt
compile requirements/dev.lock --extra model --extra training --extra test --constraint build/torch-constraint.txt
compile requirements/model.lock --extra model --constraint requirements/dev.lock \
  --constraint build/torch-constraint.txt
compile requirements/gpu.lock --extra model --extra gpu --constraint requirements/dev.lock \
  --constraint build/torch-constraint.txt
compile requirements/base.lock --constraint requirements/dev.lock
log "done: commit requirements/*.lock"
