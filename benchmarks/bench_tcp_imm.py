"""How immediates travel over libfabric tcp, two ways against each other:

    .venv/bin/python benchmarks/bench_tcp_imm.py [--compare imm|split] [--pairs 3]
                                                 [--cases reference,small,small-landing] [--json PATH]

--compare imm (default): KVXFER_IMM=coalesced (data writes carry no immediate; after a layer's writes on a rail one
zero-byte write counts them all) against each (an immediate for every write).
--compare split: with an immediate for every write (KVXFER_IMM=each), KVXFER_TCP_IMM=split (a write's data as a
plain write and its immediate in a zero-byte write after it, so releasing a peer cut off mid-write cannot crash
libfabric 1.17; csrc/transports/fabric/split_writes.h) against inline (one write with immediate).
Each case runs kvxfer-bench in fresh processes, alternating the modes (which one goes first flips every pair), and
takes the ratio to the raw TCP limit that kvxfer-bench measures in the same run:
- reference: the 512 MiB paged llama3-8b request (32 KiB writes, 16,384 per transfer);
- small: 1-token blocks (2 KiB chunks, 32,768 per transfer, gathered 4 a write: landing slots off), 64 MiB: the
  worst case, where an immediate per write is one more message (or completion) per 8 KiB;
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


COMPARE = {  # the two modes, and the environment each runs with
    "imm": {"coalesced": {"KVXFER_IMM": "coalesced"}, "each": {"KVXFER_IMM": "each"}},
    "split": {"split": {"KVXFER_IMM": "each", "KVXFER_TCP_IMM": "split"},
              "inline": {"KVXFER_IMM": "each", "KVXFER_TCP_IMM": "inline"}},
}


def run(mode_env: dict, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        env = dict(os.environ, **mode_env, FI_TCP_IFACE="lo", PYTHONPATH=ROOT)
        subprocess.run([sys.executable, "-m", "kvxfer.bench.cli", "--transport", "tcp", "--quiet", "--json", out, *args],
                       env=env, check=True, timeout=600, capture_output=True)
        with open(out) as f:
            rec = json.load(f)["records"][0]
    return {k: rec[k] for k in ("ratio", "gbps", "limit_gbps", "p50_us", "writes_per_transfer", "nbytes")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", choices=sorted(COMPARE), default="imm",
                    help="imm: coalesced immediates against one per write (default); split: split against inline")
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
        first, second = COMPARE[a.compare]
        runs = {first: [], second: []}
        for i in range(a.pairs):
            for mode in ((first, second) if i % 2 == 0 else (second, first)):
                r = run(COMPARE[a.compare][mode], args)
                runs[mode].append(r)
                print(f"{case:13} {mode:9} ratio {r['ratio']:.3f}  {r['gbps']:.2f} GB/s of {r['limit_gbps']:.2f}  "
                      f"p50 {r['p50_us'] / 1000:.1f} ms  {r['writes_per_transfer']} writes", flush=True)
        med = {m: statistics.median(x["ratio"] for x in v) for m, v in runs.items()}
        results[case] = {"runs": runs, "median_ratio": med, f"{first}_over_{second}": med[first] / med[second]}
        print(f"{case:13} median ratio to raw TCP: {first} {med[first]:.3f}, {second} {med[second]:.3f}, "
              f"{first} / {second} {med[first] / med[second]:.3f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
