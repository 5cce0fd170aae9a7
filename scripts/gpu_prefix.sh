#!/usr/bin/env bash
# Assemble a libfabric prefix for a GPU machine whose image has no libfabric: this machine's libfabric library, the
# libraries it links that such an image may lack, its headers, a pkg-config file that points at the prefix wherever
# it lands (${pcfiledir}), and a pkg-config binary. Then, on the GPU machine:
#
#   KVXFER_FABRIC_PREFIX=.gpu scripts/gpu_check.sh build tests bench
#
# .gpu is git-ignored: carry it with the command (the device tool's carry=[".gpu"]). Usage: scripts/gpu_prefix.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
P=${1:-.gpu}
command -v pkg-config >/dev/null && pkg-config --exists libfabric ||
  { echo "gpu_prefix: libfabric is not installed here (./scripts/setup.sh installs libfabric-dev)" >&2; exit 1; }
libdir=$(pkg-config --variable=libdir libfabric)
incdir=$(pkg-config --variable=includedir libfabric)
rm -rf "$P"
mkdir -p "$P/lib/pkgconfig" "$P/include" "$P/bin"
cp -L "$libdir/libfabric.so.1" "$P/lib/"
ln -s libfabric.so.1 "$P/lib/libfabric.so"
# What libfabric links, except the C runtime every image has.
for dep in $(ldd "$libdir/libfabric.so.1" | awk '$3 ~ /^\// {print $3}'); do
  case $(basename "$dep") in libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*) continue ;; esac
  cp -L "$dep" "$P/lib/"
done
cp -r "$incdir/rdma" "$P/include/"
sed -e 's|^prefix=.*|prefix=${pcfiledir}/../..|' -e 's|^libdir=.*|libdir=${prefix}/lib|' \
  -e 's|^includedir=.*|includedir=${prefix}/include|' -e 's|^Libs.private:.*|Libs.private:|' \
  "$(dirname "$(pkg-config --path libfabric)")/libfabric.pc" >"$P/lib/pkgconfig/libfabric.pc"
pkgconf=$(readlink -f "$(command -v pkg-config)")
cp "$pkgconf" "$P/bin/pkg-config"
for dep in $(ldd "$pkgconf" | awk '$3 ~ /^\// {print $3}'); do
  case $(basename "$dep") in libpkgconf*) cp -L "$dep" "$P/lib/" ;; esac
done
echo "gpu_prefix: $P holds libfabric $(pkg-config --modversion libfabric) ($(du -sh "$P" | cut -f1)); on the GPU machine:" \
  "KVXFER_FABRIC_PREFIX=$P scripts/gpu_check.sh build tests bench (carry $P)"
