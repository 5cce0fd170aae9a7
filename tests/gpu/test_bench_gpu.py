"""kvxfer-bench with GPU pools (run on a machine with an NVIDIA GPU; skipped elsewhere with the reason): the three
paths a GPU pool takes on one host, each verified byte for byte by the bench itself and measured against the
device's own copy in that direction (or the wire, for tcp)."""
import os
import re
import subprocess
import sys

import pytest

from tests.gpu.conftest import requires_gpu

pytestmark = requires_gpu

ENV = {**os.environ, "FI_TCP_IFACE": "lo", "UCX_NET_DEVICES": "lo"}
SMALL = ("--tokens", "512", "--sweep", "none", "--iters", "3", "--quiet")


@pytest.mark.parametrize("args, path, limit", [
    (("--src-mem", "cuda:0", "--dst-mem", "cuda:0"), "cuda_ipc", "cudaMemcpy D2D"),
    (("--src-mem", "cuda:0", "--dst-mem", "cpu"), "staged", "cudaMemcpy D2H, pinned"),
    (("--src-mem", "cpu", "--dst-mem", "cuda:0"), "cuda_ipc", "cudaMemcpy H2D, pinned"),
    (("--src-mem", "cuda:0", "--dst-mem", "cuda:0", "--transport", "tcp"), "staged", "raw TCP sendall"),
])
def test_kvxfer_bench_gpu_pools(args, path, limit):
    r = subprocess.run([sys.executable, "-m", "kvxfer.bench.cli", *args, *SMALL, "--timeout", "60"],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("paged"))
    assert re.search(rf"^paged\s+\S+\s+{path}\s", row), r.stdout
    assert " yes" in row and f"{args[1]} -> {args[3]}" in row, r.stdout
    assert limit in r.stdout, r.stdout
