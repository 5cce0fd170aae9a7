"""kvxfer-demo: the same workload against a disaggregated (prefill node + decode node + router) and a colocated
(one node + router) deployment on this machine, each node a separate process, then a side-by-side table.

    kvxfer-demo --quick                 about a minute: 12 requests
    kvxfer-demo --json out.json --plot latency.png

The client streams every request and measures TTFT and TPOT itself; KV bytes and the KV transfer time not hidden
behind prefill come from the router's /stats. Both deployments get the same total CPU threads.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from kvxfer import bootstrap
from kvxfer.engine import workload as wl
from kvxfer.engine.metrics import RequestTiming, summarize
from kvxfer.errors import InvalidArgument


def start_router(mode: str, a) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "kvxfer.engine.router", "--mode", mode, "--spawn", "--http",
                             "127.0.0.1:0", "--model", a.model, "--transport", a.transport, "--threads",
                             str(a.threads)], stdout=subprocess.PIPE, text=True,
                            env=bootstrap.loopback_env())
    for line in proc.stdout:
        if line.startswith("router: ready"):
            return proc, line.split()[2]
    raise InvalidArgument(f"the {mode} router exited before it was ready (rc={proc.wait()})")


def stop_router(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def stream_one(url: str, item: wl.WorkItem, timing: RequestTiming, out: list) -> None:
    body = json.dumps({"prompt": item.prompt, "max_tokens": item.max_tokens, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    timing.error = chunk["error"]["message"]
                    return
                ids = chunk["choices"][0]["token_ids"]
                now = time.perf_counter()
                for t in ids:
                    out.append(t)
                    timing.first_token = timing.first_token or now
                    timing.last_token, timing.tokens = now, timing.tokens + 1
    except OSError as e:
        timing.error = str(e)


def run_mode(mode: str, items: list[wl.WorkItem], a, progress) -> tuple[dict, list[list[int]], list[RequestTiming]]:
    proc, url = start_router(mode, a)
    try:
        stream_one(url, wl.WorkItem(0, "warm up", 2), RequestTiming(time.perf_counter()), [])
        timings = [None] * len(items)
        outputs: list[list[int]] = [[] for _ in items]
        threads = []
        t0 = time.perf_counter()
        for i, item in enumerate(items):
            delay = t0 + item.arrival_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            timings[i] = RequestTiming(arrival=time.perf_counter())
            th = threading.Thread(target=stream_one, args=(url, item, timings[i], outputs[i]), daemon=True)
            th.start()
            threads.append(th)
            progress(mode, i + 1, len(items))
        for th in threads:
            th.join(900)
        duration = time.perf_counter() - t0
        with urllib.request.urlopen(url + "/stats", timeout=30) as r:
            server = json.loads(r.read())["requests"]
    finally:
        stop_router(proc)
    summary = summarize(timings, duration, a.ttft_slo, a.tpot_slo)
    server = [s for s in server if s["error"] is None and s["last_token"] is not None]
    e2e = sum(s["last_token"] - s["arrival"] for s in server)
    summary["kv_bytes"] = sum(s["kv_bytes"] for s in server)
    summary["kv_exposed_share"] = sum(s["kv_exposed_s"] for s in server) / e2e if e2e else 0.0
    summary["transport"] = "kvxfer " + a.transport if mode == "disagg" else "none (one process)"
    summary["duration_s"] = duration
    return summary, outputs, timings


def table(res: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{1000 * v:.1f}"
    rows = [("TTFT p50 / p99 (ms)", lambda s: f"{ms(s['ttft_p50'])} / {ms(s['ttft_p99'])}"),
            ("TPOT p50 / p99 (ms)", lambda s: f"{ms(s['tpot_p50'])} / {ms(s['tpot_p99'])}"),
            ("E2E p50 / p99 (ms)", lambda s: f"{ms(s['e2e_p50'])} / {ms(s['e2e_p99'])}"),
            ("goodput (req/s at SLOs)", lambda s: f"{s['goodput']:.2f}"),
            ("completed / failed", lambda s: f"{s['completed']} / {s['failed']}"),
            ("KV exposed / E2E", lambda s: f"{100 * s['kv_exposed_share']:.3f}%"),
            ("KV bytes moved", lambda s: f"{s['kv_bytes'] / 2**20:.1f} MiB"),
            ("transport", lambda s: s["transport"])]
    lines = [f"{'':26} {'disaggregated':>24} {'colocated':>24}"]
    for name, f in rows:
        lines.append(f"{name:26} {f(res['disagg']):>24} {f(res['colocated']):>24}")
    return "\n".join(lines)


def plot(path: str, timings: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("ttft", "tpot")):
        for mode, ts in timings.items():
            vals = sorted(1000 * getattr(t, metric) for t in ts if t.error is None and getattr(t, metric) is not None)
            if vals:
                ax.plot(vals, [(i + 1) / len(vals) for i in range(len(vals))], label=mode)
        ax.set_xlabel(f"{metric.upper()} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("kvxfer-demo: latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kvxfer-demo", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="12 requests, about a minute")
    ap.add_argument("--requests", type=int, help="requests (default 40; --quick 12)")
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson arrival rate, requests/s (default 2)")
    ap.add_argument("--scale", type=float, default=0.03, help="ISL/OSL scale on the seeds' statistics (default 0.03)")
    ap.add_argument("--workload", help="replay a JSONL workload instead of generating one")
    ap.add_argument("--model", default="small")
    ap.add_argument("--transport", default="tcp", help="kvxfer transport between prefill and decode (default tcp)")
    ap.add_argument("--threads", type=int, default=2, help="total torch threads per deployment")
    ap.add_argument("--ttft-slo", type=float, default=1.0, help="seconds (default 1.0)")
    ap.add_argument("--tpot-slo", type=float, default=0.1, help="seconds (default 0.1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--plot", metavar="PATH.png")
    a = ap.parse_args(argv)
    try:
        items = wl.load_jsonl(a.workload) if a.workload else \
            wl.generate(a.requests or (12 if a.quick else 40), a.rate, a.scale, a.seed)
        results, outputs, timings = {}, {}, {}

        def progress(mode, i, n):
            end = "\n" if i == n else ""
            sys.stderr.write((f"\r{mode:10} submitted {i}/{n}" if sys.stderr.isatty() else
                              (f"{mode}: submitted {n} requests" if i == n else "")) + end)
            sys.stderr.flush()

        for mode in ("disagg", "colocated"):
            results[mode], outputs[mode], timings[mode] = run_mode(mode, items, a, progress)
    except InvalidArgument as e:
        print(f"kvxfer-demo: error: {e}", file=sys.stderr)
        return 1
    results["tokens_match"] = outputs["disagg"] == outputs["colocated"]
    results["workload"] = {"requests": len(items), "prompt_tokens_mean": sum(len(i.prompt) for i in items) / len(items),
                           "max_tokens_mean": sum(i.max_tokens for i in items) / len(items)}
    print(table(results))
    print(f"greedy outputs identical in both deployments: {results['tokens_match']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"schema": 1, **results}, f, indent=1)
    if a.plot:
        plot(a.plot, timings)
    return 0 if results["tokens_match"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
