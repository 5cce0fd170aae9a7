"""How much slower is a decode step after the decode core sat idle? (the engine's prefill -> decode handoff)

A disaggregated decode node with nothing to run waits; the request that arrives then is decoded by a step that
starts cold. This times one `small` decode step (batch 1, 180-token context, one torch thread, pinned to the last
CPU) back to back (the limit: the same step, same run) and after idle gaps of several lengths, spent sleeping or
spinning, and after a 768 MiB memory sweep. Prints the median of each as a ratio to the back-to-back median.

    .venv/bin/python benchmarks/bench_cold_step.py [--reps 20] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from kvxfer.engine.kv_cache import blocks_for
from kvxfer.engine.model import PRESETS, LlamaModel

CONTEXT = 180


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json")
    a = ap.parse_args()
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    model = LlamaModel.random(PRESETS["small"], 0)
    cache = model.new_cache(64, 16)
    table = torch.arange(blocks_for(CONTEXT + 1, 16))
    model.prefill([torch.randint(0, 300, (CONTEXT,))], [table], cache)
    token, pos = torch.tensor([5]), torch.tensor([CONTEXT])

    def step_ms() -> float:
        t = time.perf_counter()
        model.decode(token, pos, [table], cache)
        return 1000 * (time.perf_counter() - t)

    def spin(s: float) -> None:
        end = time.perf_counter() + s
        while time.perf_counter() < end:
            pass

    sweep = np.ones(768 << 20, dtype=np.uint8)
    cases = {"back to back": lambda: None}
    for ms in (5, 20, 50, 200):
        cases[f"after {ms} ms asleep"] = lambda s=ms / 1000: time.sleep(s)
    cases["after 50 ms spinning"] = lambda: spin(0.05)
    cases["after a 768 MiB sweep"] = lambda: np.add(sweep, 1, out=sweep)
    cases["200 ms asleep, a warm-up step, 2 ms asleep"] = lambda: (time.sleep(0.2), step_ms(), time.sleep(0.002))
    for _ in range(20):
        step_ms()
    out = {}
    for name, before in cases.items():
        times = []
        for _ in range(a.reps):
            before()
            times.append(step_ms())
        out[name] = statistics.median(times)
    base = out["back to back"]
    print(f"decode step, small model, batch 1, {CONTEXT}-token context, {a.reps} reps, median:")
    for name, ms in out.items():
        print(f"  {name:45s} {ms:6.2f} ms  {ms / base:5.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"context": CONTEXT, "reps": a.reps, "median_ms": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
