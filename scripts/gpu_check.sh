#!/usr/bin/env bash
# Build kvxfer on a GPU machine and run what only a GPU can check: the GPU tests, then (with "bench") the GPU
# benchmarks. Uses the machine's own python3 (which must hold torch with CUDA, pybind11, cmake, ninja, pytest).
#
#   scripts/gpu_check.sh [probe] [build] [info] [tests] [bench] [demo] [suite]     (default: probe build info tests)
#
# KVXFER_FABRIC_PREFIX: a folder with lib/ (libfabric.so and what it links), include/rdma and
# lib/pkgconfig/libfabric.pc, for machines without libfabric installed (scripts/gpu_prefix.sh assembles .gpu from
# this machine's); without it, libfabric is looked up as usual and the build goes on without it when it is missing.
# Logs and JSON land in $OUT (default ./gpu-out). build + tests + bench take ~5-8 minutes on an H100/H200 host; every
# step has a time limit (a hang costs that step, not the window), and a failed step makes the exit status 1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(probe build info tests)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FI_TCP_IFACE=lo UCX_NET_DEVICES=lo IPATH_NO_BACKTRACE=1
if [ -n "${KVXFER_FABRIC_PREFIX:-}" ]; then
  P=$(cd "$KVXFER_FABRIC_PREFIX" && pwd) || { echo "KVXFER_FABRIC_PREFIX=$KVXFER_FABRIC_PREFIX: no such folder"; exit 2; }
  # Checked now: a prefix that did not travel would build without libfabric and fail minutes later, in the benches.
  ls "$P"/lib/libfabric.so* >/dev/null 2>&1 || { echo "KVXFER_FABRIC_PREFIX=$P has no lib/libfabric.so*"; exit 2; }
  export PKG_CONFIG="$P/bin/pkg-config" PKG_CONFIG_PATH="$P/lib/pkgconfig" \
    LD_LIBRARY_PATH="$P/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# The system g++ links libstdc++ as a shared library, like torch; some images put first on PATH a g++ that links it
# statically (csrc/CMakeLists.txt copes, but one libstdc++ per process is the safer build).
for c in /usr/bin/g++ /usr/bin/g++-13 /usr/bin/g++-12; do
  if [ -x "$c" ]; then export CXX=$c CUDAHOSTCXX=$c; break; fi
done
# Per-test time limits need pytest-timeout; without it the tests still run, bounded by the step's own timeout.
TO=""; TO_LONG=""
if $PY -c 'import pytest_timeout' 2>/dev/null; then TO="--timeout 120"; TO_LONG="--timeout 240"; fi
rc=0
for step in "${steps[@]}"; do
  echo "=== $step ($(date -u +%H:%M:%S))"
  case $step in
    build)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
      $PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, torch.cuda.get_device_name(0))'
      timeout 300 cmake -S csrc -B build/gpu -GNinja -DCMAKE_BUILD_TYPE=${KVXFER_BUILD_TYPE:-Release} -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DPython_EXECUTABLE="$(command -v $PY)" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" \
        -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/kvxfer" >"$OUT/build.log" 2>&1 &&
        timeout 400 cmake --build build/gpu -j "$(nproc)" >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
      grep "Build summary\|CXX compiler identification" "$OUT/build.log"
      if [ -n "${KVXFER_FABRIC_PREFIX:-}" ] && grep -q "libfabric: not found" "$OUT/build.log"; then
        echo "built without libfabric although KVXFER_FABRIC_PREFIX is set: stopping (see $OUT/build.log)"; exit 1
      fi
      ldd kvxfer/_C.cpython-*.so | grep -E "stdc|fabric|cuda" ;;
    probe)  # seconds: what the runtime allows (pidfd_getfd for VMM pools, CMA, CUDA IPC between processes)
      timeout 120 $PY scripts/gpu_probe.py 2>&1 | tee "$OUT/probe.txt"; [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1 ;;
    info) timeout 60 $PY -m kvxfer info 2>&1 | tee "$OUT/info.txt"; [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1 ;;
    tests)  # the demo test (minutes) has its own step
      # Everything skipped looks like a pass: a CUDA 13 build on a driver older than 580, a torch without CUDA.
      $PY -c 'from tests.gpu.conftest import gpu_skip_reason as r; import sys; w = r(); print("GPU tests:", w or "will run"); sys.exit(1 if w else 0)' ||
        { echo "GPU tests would all skip: stopping (nvidia-smi's driver must be new enough for the toolkit that built kvxfer)"; exit 3; }
      timeout ${KVXFER_TEST_TIMEOUT:-300} $PY -m pytest -q -p no:cacheprovider -o addopts="" -rA $TO ${KVXFER_XDIST:-} tests/gpu tests/test_gpu_paths.py \
        tests/test_staged.py tests/test_landing.py tests/test_kernel_archs.py --deselect tests/gpu/test_engine_gpu.py::test_demo_quick_on_the_gpu \
        2>&1 | tee "$OUT/tests_gpu.log" | tail -60 || rc=1 ;;
    demo)  # kvxfer-demo --quick on the GPU, both deployments (tests/gpu/test_engine_gpu.py)
      timeout 450 $PY -m pytest -q -p no:cacheprovider -o addopts="" -rA \
        tests/gpu/test_engine_gpu.py::test_demo_quick_on_the_gpu 2>&1 | tee "$OUT/demo_gpu.log" | tail -30 || rc=1 ;;
    suite)  # the whole suite, as CI runs it but with a GPU present (xdist: a crash costs one test, not the run)
      timeout ${KVXFER_SUITE_TIMEOUT:-540} $PY -m pytest -q -p no:cacheprovider -o addopts="" -rfE $TO_LONG \
        -n ${KVXFER_SUITE_WORKERS:-8} tests 2>&1 | tee "$OUT/suite.log" | tail -40 || rc=1 ;;
    bench)
      # auto: also the same paths with fabric signals (KVXFER_DOORBELL=0) and the gather kernel alone
      for mode in ${KVXFER_BENCH_COPY_MODES:-auto}; do
        extra=""; [ "$mode" = auto ] && extra="--compare-fabric-signals"
        KVXFER_GPU_COPY=$mode timeout ${KVXFER_BENCH_TIMEOUT:-300} $PY benchmarks/bench_gpu.py --reps 5 $extra \
          --json "$OUT/bench_gpu_$mode.json" 2>&1 | tee "$OUT/bench_gpu_$mode.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
      done
      timeout 90 $PY benchmarks/bench_layer_signal.py graph --json "$OUT/bench_signal.json" 2>&1 |
        tee "$OUT/bench_signal.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
exit $rc
