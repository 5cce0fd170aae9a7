"""Small chunks over tcp: written one by one (landing='needed') or packed into the receiver's landing slots ('auto').

    .venv/bin/python benchmarks/bench_small_chunks.py [--sizes 1024,4096,16384,32768] [--rounds 3] [--json PATH]

For each chunk size, 16 MiB of randomly placed chunks (kvxfer-bench --pattern paged --block-bytes S) between two
processes over libfabric tcp on loopback, the receiver's landing mode alternating between 'needed' (every chunk one
RDMA write) and 'auto' (chunks under 32 KiB packed: sender memcpy into bounce slots, one write per batch into the
receiver's landing slots, receiver memcpy into the pool). Each run's throughput is a ratio to raw TCP measured by
the same kvxfer-bench run; reported: the median ratio per mode and auto / needed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(os.path.dirname(sys.executable), "kvxfer-bench")


def one_run(chunk: int, landing: str, iters: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [BENCH, "--transport", "tcp", "--pattern", "paged", "--block-bytes", str(chunk),
               "--blocks", str((16 << 20) // chunk), "--iters", str(iters), "--landing", landing, "--quiet",
               "--json", out]
        env = dict(os.environ, FI_TCP_IFACE="lo")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
        with open(out) as f:
            rec = json.load(f)["records"][0]
    assert rec["verified"], rec["verify_detail"]
    return {"chunk": chunk, "landing": landing, "gbps": rec["gbps"], "ratio": rec["ratio"], "path": rec["path"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    runs = []
    for r in range(args.rounds):
        for chunk in (int(s) for s in args.sizes.split(",")):
            for landing in ("needed", "auto"):
                runs.append(one_run(chunk, landing, args.iters))
                x = runs[-1]
                print(f"[round {r + 1}] {chunk:>6} B chunks, landing={landing:6}: {x['gbps']:.2f} GB/s = "
                      f"{x['ratio']:.2f} of raw TCP", flush=True)
    print(f"\n{'chunk':>7} {'needed (direct)':>16} {'auto':>8} {'auto / needed':>14}")
    rows = []
    for chunk in sorted({x["chunk"] for x in runs}):
        med = {m: statistics.median(x["ratio"] for x in runs if x["chunk"] == chunk and x["landing"] == m)
               for m in ("needed", "auto")}
        rows.append({"chunk": chunk, **{f"ratio_{m}": v for m, v in med.items()}, "auto_vs_needed": med["auto"] / med["needed"]})
        print(f"{chunk:>7} {med['needed']:16.2f} {med['auto']:8.2f} {med['auto'] / med['needed']:13.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
