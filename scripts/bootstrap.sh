#!/usr/bin/env bash
# Bootstraps everything `make test` and `make demo` need on a fresh Debian machine:
#   - system tools used by the product and its tests (dcmtk, dicom3tools, Orthanc, Chromium) via apt-get,
#   - the npm `fhir` R4 validator into tools/node,
#   - .venv with the CPU build of torch 2.13.0 first, then this project with its test extras.
# Idempotent: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[bootstrap] %s\n' "$*"; }

apt_packages=(dcmtk dicom3tools orthanc chromium)
missing=()
command -v /usr/bin/storescu >/dev/null 2>&1 || missing+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
command -v Orthanc >/dev/null 2>&1 || missing+=(orthanc)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if ((${#missing[@]})); then
  log "installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
: "${apt_packages[@]}"

if command -v npm >/dev/null 2>&1 && [ ! -d tools/node/node_modules/fhir ]; then
  log "installing the npm fhir validator into tools/node"
  mkdir -p tools/node
  (cd tools/node && [ -f package.json ] || echo '{"name":"retinalgpt-test-tools","private":true}' > package.json
   npm install --silent --no-audit --no-fund fhir@4 >/dev/null)
fi

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
fi
stamp=.venv/.bootstrap-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || { log "creating .venv with $PYTHON"; "$PYTHON" -m venv .venv; }
  .venv/bin/python -m pip install -q --upgrade pip
  if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    log "installing torch==2.13.0 (CPU build)"
    .venv/bin/python -m pip install -q torch==2.13.0
  fi
  log "installing retinalgpt with test extras"
  .venv/bin/python -m pip install -q -e ".[test]"
  rm -f .venv/.bootstrap-*
  touch "$stamp"
fi
log "ready"
