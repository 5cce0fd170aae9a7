#!/usr/bin/env bash
# Installs what a fresh Debian machine (root, Python 3.11) lacks and builds kvxfer in .venv:
# libfabric-dev + pkg-config (apt), a venv, numpy/pytest, and an editable build (CUDA compiled when nvcc exists).
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
pkg-config --exists libfabric 2>/dev/null || need_apt+=(libfabric-dev libfabric-bin)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "kvxfer setup: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
[ -x /usr/local/cuda/bin/nvcc ] && export PATH="/usr/local/cuda/bin:$PATH"
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
pip install -q numpy pytest pytest-benchmark pytest-timeout pybind11 cmake ninja "setuptools>=64" wheel
echo "kvxfer setup: building (pip install -e .)"
pip install -q --no-build-isolation -e . 
python -m kvxfer info
