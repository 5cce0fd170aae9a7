"""LayerSignal costs.

  python benchmarks/bench_layer_signal.py graph   [--layers 32] [--replays 300] [--work-elems 1048576]
      GPU only. The extra time per forward pass that signal.record adds under CUDA-graph replay: two graphs of the
      same fake forward (per-layer elementwise work), one with signal.record(layer) after each layer, replayed
      alternately in the same run; reports median per-forward times and the difference per layer (goal < 5 us).
      Exits with status 1 and says why without a GPU / CUDA build / torch with CUDA.

  python benchmarks/bench_layer_signal.py watcher [--transport tcp] [--records 2000] [--gaps-us 0,100,1000]
      Host only (no GPU needed). Watcher latency: the time from a slot write (done by the host, as the record kernel
      would) to the watcher's layer_ready call for the bound send having returned, per record, at several gaps
      between records (gap 0: a whole forward's layers recorded back to back).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("FI_TCP_IFACE", "lo")


def pct(xs, q):
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def bench_graph(args) -> int:
    try:
        import torch
    except ImportError:
        print("graph benchmark: torch is not installed; it needs torch with CUDA and a GPU", file=sys.stderr)
        return 1
    import kvxfer

    if not torch.cuda.is_available():
        print("graph benchmark: no GPU (torch.cuda.is_available() is False); it did not run", file=sys.stderr)
        return 1
    usable, why = kvxfer.signals.cuda_status()
    if not usable:
        print(f"graph benchmark: kvxfer cannot use the GPU: {why}; it did not run", file=sys.stderr)
        return 1
    agent = kvxfer.Agent("bench-signal", transport=args.transport, interface="lo")
    sig = kvxfer.LayerSignal(agent, args.layers, max_bindings=4096)
    x = torch.randn(args.work_elems, device="cuda")

    def forward(with_records):
        h = x
        for layer in range(args.layers):
            h = torch.tanh(h * 1.0001 + 0.001)  # one small kernel per "layer"
            if with_records:
                sig.record(layer)
        return h

    graphs = {}
    for name, rec in (("plain", False), ("records", True)):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward(rec)  # warm-up (allocator); with records it is one forward, bound below
        torch.cuda.current_stream().wait_stream(side)
        if rec:
            sig.bind([])
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            forward(rec)
        graphs[name] = g
    torch.cuda.synchronize()
    times = {"plain": [], "records": []}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for i in range(args.replays + 10):
        for name in (("plain", "records") if i % 2 == 0 else ("records", "plain")):
            if name == "records":
                sig.bind([])  # host side of the protocol, off the GPU timeline
            start.record()
            graphs[name].replay()
            end.record()
            end.synchronize()
            if i >= 10:
                times[name].append(start.elapsed_time(end) * 1000.0)  # us
    sig.drain(timeout_s=30)
    st = sig.stats()
    assert st["records_delivered"] == (args.replays + 11) * args.layers, st
    p, r = statistics.median(times["plain"]), statistics.median(times["records"])
    print(f"device: {torch.cuda.get_device_name()}  layers={args.layers} replays={args.replays} "
          f"work={args.work_elems} fp32 elems/layer")
    print(f"forward without records: median {p:.1f} us (p10 {pct(times['plain'], 10):.1f}, p90 {pct(times['plain'], 90):.1f})")
    print(f"forward with records:    median {r:.1f} us (p10 {pct(times['records'], 10):.1f}, p90 {pct(times['records'], 90):.1f})")
    print(f"extra per forward: {r - p:.1f} us = {(r - p) / args.layers:.2f} us per layer (goal < 5 us per layer)")
    print(f"watcher: {st['forwards_delivered']} forwards delivered, {st['records_delivered']} records, 0 lost")
    if args.json:
        import datetime
        import json

        per_layer = (r - p) / args.layers
        with open(args.json, "w") as f:
            json.dump({"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "kvxfer_build": kvxfer._C.build_info, "layers": args.layers, "replays": args.replays,
                       "work_elems": args.work_elems, "forward_plain_us_median": p, "forward_records_us_median": r,
                       "extra_per_layer_us": per_layer, "goal_us_per_layer": 5.0, "goal_met": per_layer < 5.0,
                       "forwards_delivered": st["forwards_delivered"], "records_delivered": st["records_delivered"]},
                      f, indent=1)
    return 0


def bench_watcher(args) -> int:
    import kvxfer
    from kvxfer import KVLayout

    layout = KVLayout.vllm_flash(32, 8, 16, 1, 64, "float16")  # 32 layers, one 4 KiB block per layer
    a = kvxfer.Agent("bench-sig-sender", transport=args.transport, interface="lo")
    b = kvxfer.Agent("bench-sig-receiver", transport=args.transport, interface="lo")
    src = [np.zeros(layout.tensor_layer_bytes, np.uint8) for _ in range(layout.num_layers)]
    dst = [np.zeros(layout.tensor_layer_bytes, np.uint8) for _ in range(layout.num_layers)]
    a.register_pool(src, layout)
    b.register_pool(dst, layout)
    pb = a.add_peer(b.metadata())
    pa = b.add_peer(a.metadata())
    b.wait_connected(pa, 20)
    layers = layout.num_layers
    print(f"watcher latency: slot write -> layer_ready returned, {args.transport} path, {layers} layers per forward, "
          f"{args.records} records per gap; host {platform.node()} ({os.cpu_count()} cores)")
    print(f"{'gap us':>7} {'p50 us':>8} {'p90 us':>8} {'p99 us':>8} {'max us':>8}")
    xfer = 0
    for gap_us in args.gaps_us:
        sig = kvxfer.LayerSignal(a, layers, device=False)
        sig._c.enable_probe()
        samples = []
        forwards = max(1, args.records // layers)
        for _ in range(forwards):
            xfer += 1
            recv = b.recv(pa, xfer, [0])
            sig.bind([a.send(pb, xfer, [0], [0])])
            for layer in range(layers):
                if gap_us:
                    t_end = time.perf_counter() + gap_us / 1e6
                    while time.perf_counter() < t_end:  # busy gap: the model computing the next layer
                        pass
                sig._host_record(layer)
            recv.wait(timeout_s=30)
        sig.drain(timeout_s=30)
        samples = np.asarray(sig._c.take_latency_samples(), dtype=np.float64) / 1000.0
        assert len(samples) == forwards * layers, (len(samples), forwards * layers)
        print(f"{gap_us:>7} {pct(samples, 50):>8.1f} {pct(samples, 90):>8.1f} {pct(samples, 99):>8.1f} "
              f"{samples.max():>8.1f}")
        sig.close()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["graph", "watcher"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--replays", type=int, default=300)
    ap.add_argument("--work-elems", type=int, default=1 << 20)
    ap.add_argument("--transport", default="tcp")
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--gaps-us", type=lambda s: [int(v) for v in s.split(",")], default=[0, 100, 1000])
    ap.add_argument("--json", metavar="PATH", help="graph: also write the numbers and the goal's verdict here")
    args = ap.parse_args(argv)
    return bench_graph(args) if args.what == "graph" else bench_watcher(args)


if __name__ == "__main__":
    sys.exit(main())
