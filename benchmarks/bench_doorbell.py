"""Same-host completion signals: shared-memory doorbell rings against zero-byte fabric writes, in the same run.

    .venv/bin/python benchmarks/bench_doorbell.py [--transport cma] [--rounds 3] [--n 300] [--json PATH]

Two agents on one host with the CMA data path; KVXFER_DOORBELL=1 (signals and control messages through the
receiver's rings) and =0 (zero-byte writes with immediate data and fabric messages, the old way), each in a fresh
process, alternating which goes first (--interleave: both pairs in one process, transfer by transfer). Measured:
- small: a 1-block transfer of 4 layers sent back to back; time from all_ready() to the receiver's wait() returning
  (recv) and to the sender's wait() returning (send: includes the receiver's RELEASE coming back).
- gapped: the same after 20 ms of idle (both progress threads asleep in poll(): the signal must wake the receiver).
- layer: a 32-layer request (Llama-3-8B shape, 4 blocks = 256 KiB per layer) marked one layer at a time; time from
  layer_ready(l) to recv.wait(layer=l) returning.
The figure of merit is the doorbell's latency as a ratio to the fabric's, both measured in the same round.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quantiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50_us": 1e6 * xs[len(xs) // 2], "p99_us": 1e6 * xs[max(0, int(len(xs) * 0.99) - 1)]}


def make_pair(layout, transport: str, doorbell: bool, tag: str):
    import kvxfer
    from tests.reference import make_pool

    a = kvxfer.Agent(f"db-{tag}-s", transport=transport, interface="lo", doorbell=doorbell)
    b = kvxfer.Agent(f"db-{tag}-r", transport=transport, interface="lo", doorbell=doorbell)
    a.register_pool(make_pool(layout, 1), layout)
    b.register_pool(make_pool(layout, 2), layout)
    peer_b, peer_a = a.add_peer(b.metadata()), b.add_peer(a.metadata())
    a.wait_connected(peer_b, 20)
    b.wait_connected(peer_a, 20)
    assert peer_b.signals == ("doorbell" if doorbell else "fabric"), peer_b.signals_reason
    return a, b, peer_b, peer_a


def small(pair, i: int) -> tuple[float, float]:
    a, b, peer_b, peer_a = pair
    recv = b.recv(peer_a, i, [i % 32])
    send = a.send(peer_b, i, [i % 32], [(i * 7) % 32])
    t0 = time.perf_counter()
    send.all_ready()
    recv.wait(timeout_s=30)
    t1 = time.perf_counter()
    send.wait(timeout_s=30)
    return t1 - t0, time.perf_counter() - t0


def layer_by_layer(pair, i: int, num_layers: int) -> list[float]:
    a, b, peer_b, peer_a = pair
    ids = [(i * 4 + k) % 64 for k in range(4)]
    recv = b.recv(peer_a, i, ids)
    send = a.send(peer_b, i, ids, ids)
    out = []
    for layer in range(num_layers):
        t0 = time.perf_counter()
        send.layer_ready(layer)
        recv.wait(layer=layer, timeout_s=30)
        out.append(time.perf_counter() - t0)
    send.wait(timeout_s=30)
    return out


def child(transport: str, n: int, which: str) -> None:
    """One configuration, or both taking turns transfer by transfer (which == "both")."""
    sys.path.insert(0, ROOT)
    import kvxfer
    from tests.reference import PRESETS

    configs = {k: v for k, v in {"fabric": False, "doorbell": True}.items() if which in (k, "both")}
    small_pairs = {k: make_pair(PRESETS["vllm_flash"](), transport, v, k) for k, v in configs.items()}
    llama = kvxfer.KVLayout.vllm_flash(32, 64, 16, 8, 128, "bfloat16")  # Llama-3-8B: 8 KV heads x 128, bf16
    layer_pairs = {k: make_pair(llama, transport, v, k + "-l") for k, v in configs.items()}
    res = {k: {"back": [], "gapped": [], "layer": []} for k in configs}
    for i in range(50):  # warm-up
        for k in configs:
            small(small_pairs[k], i)
    for i in range(n):
        for k in configs:
            res[k]["back"].append(small(small_pairs[k], 1000 + i))
    for i in range(n // 3):
        for k in configs:
            time.sleep(0.02)
            res[k]["gapped"].append(small(small_pairs[k], 5000 + i)[0])
    for i in range(max(3, n // 30)):
        for k in configs:
            res[k]["layer"] += layer_by_layer(layer_pairs[k], i, llama.num_layers)
    out = {}
    for k in configs:
        a, b, *_ = small_pairs[k]
        a2, b2, *_ = layer_pairs[k]
        out[k] = {
            "recv": quantiles([r for r, _ in res[k]["back"]]), "send": quantiles([s for _, s in res[k]["back"]]),
            "gapped": quantiles(res[k]["gapped"]), "layer": quantiles(res[k]["layer"]),
            "doorbell_sent": a.stats()["doorbell_sent"] + a2.stats()["doorbell_sent"],
            "fabric_imms": b.stats()["imms_received"] + b2.stats()["imms_received"],
            "wakes": a.stats()["doorbell_wakes"] + a2.stats()["doorbell_wakes"],
        }
    print(json.dumps(out))


def run_child(transport: str, n: int, which: str) -> dict:
    env = {**os.environ, "FI_TCP_IFACE": "lo"}
    out = subprocess.run([sys.executable, __file__, "--child", transport, str(n), which], env=env,
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"child failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_round(transport: str, n: int, interleave: bool, r: int) -> dict:
    if interleave:
        return run_child(transport, n, "both")
    order = ["fabric", "doorbell"] if r % 2 == 0 else ["doorbell", "fabric"]  # neither always goes first
    out = {}
    for which in order:
        out.update(run_child(transport, n, which))
    return out


METRICS = [("recv", "small transfer, all_ready -> recv done"), ("send", "small transfer, all_ready -> send done"),
           ("gapped", "after 20 ms idle, -> recv done"), ("layer", "layer_ready(l) -> layer l done")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--transport", default="cma")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=300, help="back-to-back small transfers per configuration")
    ap.add_argument("--interleave", action="store_true",
                    help="both configurations in one process, transfer by transfer (4 agents share the CPUs)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return 0
    rounds = []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
        rounds.append(run_round(args.transport, args.n, args.interleave, r))
    print(f"transport {args.transport}, {args.rounds} rounds; p50 / p99 in microseconds, ratio = doorbell / fabric "
          f"of the same round (median over rounds)")
    print(f"{'measure':42s} {'fabric p50':>10s} {'doorbell p50':>12s} {'ratio':>6s} {'fabric p99':>10s} "
          f"{'doorbell p99':>12s} {'ratio':>6s}")
    summary = {}
    for key, label in METRICS:
        row = {}
        for q in ("p50_us", "p99_us"):
            f = statistics.median(x["fabric"][key][q] for x in rounds)
            d = statistics.median(x["doorbell"][key][q] for x in rounds)
            ratio = statistics.median(x["doorbell"][key][q] / x["fabric"][key][q] for x in rounds)
            row[q] = {"fabric": f, "doorbell": d, "ratio": ratio}
        summary[key] = row
        print(f"{label:42s} {row['p50_us']['fabric']:10.1f} {row['p50_us']['doorbell']:12.1f} "
              f"{row['p50_us']['ratio']:6.2f} {row['p99_us']['fabric']:10.1f} {row['p99_us']['doorbell']:12.1f} "
              f"{row['p99_us']['ratio']:6.2f}")
    for x in rounds:
        assert x["doorbell"]["fabric_imms"] == 0 and x["fabric"]["doorbell_sent"] == 0, "configurations mixed up"
    print(f"doorbell wake-ups of a sleeping receiver per round: {[x['doorbell']['wakes'] for x in rounds]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"transport": args.transport, "n": args.n, "interleave": args.interleave, "summary": summary,
                       "rounds": rounds}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
