#!/usr/bin/env bash
# Installs the libraries kvxfer-compare measures kvxfer against (NIXL and Mooncake's Transfer Engine) into their
# own venv, .venv-peers, for `kvxfer-compare` and its tests (tests/bench/test_compare.py). Called by
# scripts/setup.sh; KVXFER_SKIP_PEERS=1 skips it (those tests then skip, saying so).
#
# Why a venv of their own: both bundle native libraries (NIXL its own UCX, Mooncake glog/asio/etcd) that must not
# load next to kvxfer's UCX and libfabric; kvxfer-compare runs them in processes of this venv's Python only.
# Why --no-deps for NIXL: its wheel asks for torch, which would pull several GB of CUDA wheels; its Python API
# needs only numpy (it imports torch only when handed tensors), and runs here on host memory without a GPU.
# The CPU builds: nixl-cu12 loads without a CUDA driver (its CUDA plugins fail to load and are left out);
# mooncake-transfer-engine-non-cuda is Mooncake's build without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${KVXFER_SKIP_PEERS:-0}" = 1 ]; then
  echo "kvxfer setup_peers: skipped (KVXFER_SKIP_PEERS=1); the kvxfer-compare tests of NIXL and Mooncake will skip"
  exit 0
fi
VENV=.venv-peers
SPEC="nixl-cu12==1.5.1 mooncake-transfer-engine-non-cuda==0.3.13.post1"
marker="$VENV/.kvxfer-peers-ok"
if [ -f "$marker" ] && [ "$(cat "$marker")" = "$SPEC" ]; then
  echo "kvxfer setup_peers: $VENV already has $SPEC"
  exit 0
fi
start=$(date +%s)
[ -d "$VENV" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
echo "kvxfer setup_peers: pip install $SPEC into $VENV (~115 MB download)"
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }
# shellcheck disable=SC2086
if ! { "$VENV/bin/pip" install -q numpy 2>&1 | quiet
       "$VENV/bin/pip" install -q --no-deps nixl-cu12==1.5.1 2>&1 | quiet
       "$VENV/bin/pip" install -q mooncake-transfer-engine-non-cuda==0.3.13.post1 2>&1 | quiet; }; then
  true
fi
if ! "$VENV/bin/python" -c "import nixl_cu12._api, mooncake.engine" 2> "$VENV/.import-check.log"; then
  tail -3 "$VENV/.import-check.log" >&2
  echo "kvxfer setup_peers: import check failed; the kvxfer-compare tests of NIXL and Mooncake will skip" >&2
  rm -f "$marker"
  exit 0
fi
echo "$SPEC" > "$marker"
echo "kvxfer setup_peers: ok in $(( $(date +%s) - start )) s"
