"""What splitting writes with immediates costs over libfabric tcp: KVXFER_TCP_IMM=split (the default) against inline.

    .venv/bin/python benchmarks/bench_tcp_imm.py [--pairs 3] [--cases reference,small,small-landing] [--json PATH]

On tcp kvxfer sends a write's data as a plain write and its immediate in a zero-byte write after it (so releasing a
peer cut off mid-write cannot crash libfabric 1.17; csrc/transports/fabric/split_writes.h); inline sends one write
with immediate. Each case runs kvxfer-bench in fresh processes, alternating the modes (which one goes first flips
every pair), and takes the ratio to the raw TCP limit that kvxfer-bench measures in the same run:
- reference: the 512 MiB paged llama3-8b request (32 KiB writes, 16,384 per transfer);
- small: 1-token blocks (2 KiB chunks, one write each: landing slots off), 64 MiB, 32,768 writes per transfer:
  the worst case, where the zero-byte write is one more message per 2 KiB;
- small-landing: the same with landing slots on (the default for chunks under 32 KiB on tcp): chunks packed into
  slot-sized writes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {
    "reference": ["--pattern", "paged", "--iters", "5"],
    "small": ["--pattern", "paged", "--block-size", "1", "--tokens", "512", "--landing", "needed", "--iters", "5"],
    "small-landing": ["--pattern", "paged", "--block-size", "1", "--tokens", "512", "--iters", "5"],
}


def run(mode: str, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        env = dict(os.environ, KVXFER_TCP_IMM=mode, FI_TCP_IFACE="lo", PYTHONPATH=ROOT)
        subprocess.run([sys.executable, "-m", "kvxfer.bench.cli", "--transport", "tcp", "--quiet", "--json", out, *args],
                       env=env, check=True, timeout=600, capture_output=True)
        with open(out) as f:
            rec = json.load(f)["records"][0]
    return {k: rec[k] for k in ("ratio", "gbps", "limit_gbps", "p50_us", "writes_per_transfer", "nbytes")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3, help="runs of each mode per case (default: 3)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)} (default: all)")
    ap.add_argument("--json", metavar="PATH", help="write every run and the medians here")
    a = ap.parse_args()
    results = {}
    cases = a.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    for case in cases:
        args = CASES[case]
        runs = {"split": [], "inline": []}
        for i in range(a.pairs):
            for mode in (("split", "inline") if i % 2 == 0 else ("inline", "split")):
                r = run(mode, args)
                runs[mode].append(r)
                print(f"{case:9} {mode:6} ratio {r['ratio']:.3f}  {r['gbps']:.2f} GB/s of {r['limit_gbps']:.2f}  "
                      f"p50 {r['p50_us'] / 1000:.1f} ms  {r['writes_per_transfer']} writes", flush=True)
        med = {m: statistics.median(x["ratio"] for x in v) for m, v in runs.items()}
        results[case] = {"runs": runs, "median_ratio": med, "split_over_inline": med["split"] / med["inline"]}
        print(f"{case:9} median ratio to raw TCP: split {med['split']:.3f}, inline {med['inline']:.3f}, "
              f"split / inline {results[case]['split_over_inline']:.3f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
