"""kvxfer-demo: the same workload against a disaggregated (prefill node + decode node + router) and a colocated
(one node + router) deployment, each node a separate process, then a side-by-side table.

    kvxfer-demo --quick                 about a minute: 12 short requests
    kvxfer-demo                         the reference run (a few minutes)
    kvxfer-demo --json out.json --plot latency.png

Network (--net): `netns` puts the prefill node (with the router and the client) and the decode node in two network
namespaces joined by a veth pair, each with its own address, so the KV crosses a real link between two "hosts"
(needs root and iproute2; namespaces are removed at exit); `loopback` runs everything on 127.0.0.1; `auto` (the
default) takes netns when it can and says which it used. Two real hosts:

    host A:  kvxfer-demo --role router --nodes 0.0.0.0:7000 [workload flags]
    host A:  kvxfer-demo --role prefill --connect A:7000        (any host)
    host B:  kvxfer-demo --role decode --connect A:7000

The client streams every request and measures TTFT and TPOT itself; KV bytes and the KV transfer time not hidden
behind prefill come from the router's /stats. Both deployments get the same total CPU threads.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

from kvxfer import bootstrap
from kvxfer.engine import workload as wl
from kvxfer.engine.metrics import RequestTiming, percentile, summarize
from kvxfer.engine.router import reap
from kvxfer.errors import InvalidArgument


@dataclass
class Net:
    """Where the disaggregated nodes run and how they reach the router."""

    kind: str                   # "loopback" | "netns" | "two-host"
    detail: str
    router_host: str            # the address the router takes node connections on
    iface_a: str | None = None  # the router / prefill host's interface
    iface_b: str | None = None  # the decode host's interface
    prefix_b: list = field(default_factory=list)  # runs a command on the decode host ([] locally)
    node_port: int = 0
    remote_nodes: bool = False  # two-host: nodes are started by hand (kvxfer-demo --role prefill|decode)


def _router(mode: str, a, extra: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kvxfer.engine.router", "--mode", mode, "--http", "127.0.0.1:0",
                             "--model", a.model, "--transport", a.transport, "--threads", str(a.threads),
                             "--timeout", str(a.timeout), "--device", a.device, *extra], stdout=subprocess.PIPE, text=True,
                            env=bootstrap.loopback_env())


def _read_until(proc: subprocess.Popen, prefix: str, mode: str) -> str:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.strip()
    raise InvalidArgument(f"the {mode} router exited before it printed {prefix!r} (rc={proc.wait()})")


def start_deployment(mode: str, a, net: Net) -> tuple[list[subprocess.Popen], str]:
    """Start the router (and, unless they are remote, its nodes). Returns the processes (router first), the URL."""
    if mode == "colocated":  # one node on the router's host
        router = _router(mode, a, ["--spawn"])
        return [router], _read_until(router, "router: ready", mode).split()[2]
    router = _router(mode, a, ["--nodes", f"{net.router_host}:{net.node_port}"])
    procs = [router]
    try:
        node_addr = _read_until(router, "router: nodes on", mode).split()[-1]
        if net.remote_nodes:
            print(f"router: waiting for the nodes; start them with\n  kvxfer-demo --role prefill --connect "
                  f"{node_addr}\n  kvxfer-demo --role decode --connect {node_addr}", file=sys.stderr, flush=True)
        else:
            half = a.threads // 2 or 1
            cpus = node_cpus(a.pin)
            for role, prefix, iface, threads in (("prefill", [], net.iface_a, half),
                                                 ("decode", net.prefix_b, net.iface_b, a.threads - half or 1)):
                cmd = [*prefix, sys.executable, "-m", "kvxfer.engine.node", role, "--connect", node_addr,
                       "--model", a.model, "--transport", a.transport, "--timeout", str(a.timeout),
                       "--threads", str(threads), "--device", a.device, *(["--iface", iface] if iface else []),
                       *(["--cpus", cpus[role]] if cpus else [])]
                env = {**os.environ, **({"FI_TCP_IFACE": iface} if iface else {})}
                procs.append(subprocess.Popen(cmd, env=env))
            reap(procs[1:])
        return procs, _read_until(router, "router: ready", mode).split()[2]
    except BaseException:
        stop(procs)
        raise


def transport_label(mode: str, transport: str, net_kind: str, paths: list) -> str:
    """What moved the KV: the transport asked for and the paths kvxfer took (Send.path per request), e.g.
    'kvxfer tcp, path fabric (netns)' or 'kvxfer tcp, path cuda_ipc (loopback)'."""
    if mode != "disagg":
        return "none (one process)"
    taken = sorted({p for p in paths if p})
    return f"kvxfer {transport}" + (f", path {'+'.join(taken)}" if taken else "") + f" ({net_kind})"


def node_cpus(pin: str) -> dict[str, str] | None:
    """--pin auto: the disaggregated nodes get disjoint halves of this process's CPUs (prefill the first, decode
    the second), as separate GPUs would not share compute; the colocated node keeps them all. None: no pinning
    (--pin off, or fewer than 2 CPUs)."""
    allowed = sorted(os.sched_getaffinity(0))
    if pin == "off" or len(allowed) < 2:
        return None
    half = len(allowed) // 2
    return {"prefill": ",".join(map(str, allowed[:half])), "decode": ",".join(map(str, allowed[half:]))}


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGINT the router (it says bye to its nodes), then make sure every process is gone."""
    if procs and procs[0].poll() is None:
        procs[0].send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def stream_one(url: str, item: wl.WorkItem, timing: RequestTiming, out: list, done: list | None = None) -> None:
    try:
        _stream(url, item, timing, out)
    finally:
        if done is not None:
            done.append(1)


def _stream(url: str, item: wl.WorkItem, timing: RequestTiming, out: list) -> None:
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
                    timing.token_times.append(now)
    except OSError as e:
        timing.error = str(e)


def warm_up(url: str) -> None:
    """A few concurrent requests before the measured ones, in both deployments: the first batched prefill and
    decode steps, kvxfer's first transfers and the HTTP paths pay their one-time costs here, not in the first
    burst of the workload."""
    prompts = ["warm up", "warm up the batch", "warm up the batch and decode a few steps"]
    threads = [threading.Thread(target=stream_one, args=(url, wl.WorkItem(0, p, 8), RequestTiming(time.perf_counter()),
                                                          []), daemon=True) for p in prompts]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)


def run_mode(mode: str, items: list[wl.WorkItem], a, net: Net) -> tuple[dict, list[list[int]], list[RequestTiming]]:
    if a.trace:  # the nodes inherit it: each writes TRACE/MODE/ROLE.jsonl, one line per decode step
        os.makedirs(os.path.join(a.trace, mode), exist_ok=True)
        os.environ["KVXFER_ENGINE_TRACE_DIR"] = os.path.abspath(os.path.join(a.trace, mode))
    procs, url = start_deployment(mode, a, net)
    try:
        warm_up(url)
        timings = [RequestTiming(arrival=0.0) for _ in items]
        outputs: list[list[int]] = [[] for _ in items]
        threads, done = [], []
        with StallMeter() as meter:
            t0 = time.perf_counter()
            ticker = Progress(mode, len(items), threads, done, t0)
            for i, item in enumerate(items):
                delay = t0 + item.arrival_s - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                timings[i].arrival = time.perf_counter()
                th = threading.Thread(target=stream_one, args=(url, item, timings[i], outputs[i], done), daemon=True)
                th.start()
                threads.append(th)
                ticker.maybe_print()
            for th in threads:
                while th.is_alive():
                    th.join(1.0)
                    ticker.maybe_print()
            ticker.print_line(final=True)
            duration = time.perf_counter() - t0
        with urllib.request.urlopen(url + "/stats", timeout=30) as r:
            server = json.loads(r.read())["requests"]
    finally:
        stop(procs)
    summary = summarize(timings, duration, a.ttft_slo, a.tpot_slo)
    server = [s for s in server if s["error"] is None and s["last_token"] is not None]
    e2e = sum(s["last_token"] - s["arrival"] for s in server)
    summary["kv_bytes"] = sum(s["kv_bytes"] for s in server)
    summary["kv_exposed_share"] = sum(s["kv_exposed_s"] for s in server) / e2e if e2e else 0.0
    summary["kv_exposed_mean_ms"] = 1000 * sum(s["kv_exposed_s"] for s in server) / len(server) if server else 0.0
    summary["e2e_mean_ms"] = 1000 * e2e / len(server) if server else 0.0
    summary["transport"] = transport_label(mode, a.transport, net.kind, [s.get("kv_path") for s in server])
    summary["duration_s"] = duration
    summary["machine_stalls"] = meter.summary(timings)
    return summary, outputs, timings


class StallMeter:
    """Machine stalls during a run: a thread that sleeps 1 ms at a time and records every oversleep >= min_ms. This
    process is nearly idle (client threads wait on sockets), so a long oversleep means the machine did not run it at
    all (a VM paused, every core taken), not that kvxfer or the engine was slow. Token gaps that overlap such a stall
    are reported apart, so a latency tail can be told from the machine's."""

    def __init__(self, min_ms: float = 50.0):
        self.min_s, self.stalls, self._stop = min_ms / 1000, [], threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-meter", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            time.sleep(0.001)
            t1 = time.perf_counter()
            if t1 - t0 >= self.min_s:
                self.stalls.append((t0, t1))

    def overlaps(self, a: float, b: float) -> bool:
        return any(s0 < b and a < s1 for s0, s1 in self.stalls)

    def tpot_outside_stalls(self, t: RequestTiming) -> float | None:
        """A diagnostic, not the TPOT: the mean token gap over the gaps that overlap no machine stall."""
        gaps = [y - x for x, y in zip(t.token_times, t.token_times[1:]) if not self.overlaps(x, y)]
        return sum(gaps) / len(gaps) if gaps else None

    def summary(self, timings: list[RequestTiming], gap_s: float = 0.05) -> dict:
        ok = [t for t in timings if t.error is None]
        gaps = [(x, y) for t in ok for x, y in zip(t.token_times, t.token_times[1:]) if y - x >= gap_s]
        clean = [self.tpot_outside_stalls(t) for t in ok]
        return {"count": len(self.stalls), "total_s": round(sum(b - a for a, b in self.stalls), 3),
                "max_ms": round(1000 * max((b - a for a, b in self.stalls), default=0.0), 1),
                "token_gaps_ge_50ms": len(gaps), "of_them_during_a_stall": sum(self.overlaps(x, y) for x, y in gaps),
                "tpot_outside_stalls_p50": percentile(clean, 50), "tpot_outside_stalls_p99": percentile(clean, 99)}


class Progress:
    """One status line every few seconds on long runs (carriage return on a terminal, lines otherwise)."""

    def __init__(self, mode: str, n: int, threads: list, done: list, t0: float, every_s: float = 5.0):
        self.mode, self.n, self.threads, self.done, self.t0, self.every_s = mode, n, threads, done, t0, every_s
        self.last = t0

    def maybe_print(self) -> None:
        if time.perf_counter() - self.last >= self.every_s:
            self.print_line()

    def print_line(self, final: bool = False) -> None:
        self.last = time.perf_counter()
        tty = sys.stderr.isatty()
        line = (f"{self.mode:10} {len(self.threads)}/{self.n} submitted, {len(self.done)}/{self.n} done, "
                f"{self.last - self.t0:.0f} s")
        sys.stderr.write(("\r" + line + ("\n" if final else "")) if tty else line + "\n")
        sys.stderr.flush()


def table(res: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{1000 * v:.1f}"
    rows = [("TTFT p50 / p99 (ms)", lambda s: f"{ms(s['ttft_p50'])} / {ms(s['ttft_p99'])}"),
            ("TPOT p50 / p99 (ms)", lambda s: f"{ms(s['tpot_p50'])} / {ms(s['tpot_p99'])}"),
            ("TPOT p99 / p50", lambda s: f"{s['tpot_p99'] / s['tpot_p50']:.2f}x" if s["tpot_p50"] else "-"),
            ("token gaps p50 / p99 (ms)", lambda s: _pair_ms(s.get("itl_p50"), s.get("itl_p99"))),
            ("E2E p50 / p99 (ms)", lambda s: f"{ms(s['e2e_p50'])} / {ms(s['e2e_p99'])}"),
            ("goodput (req/s at SLOs)", lambda s: f"{s['goodput']:.2f}"),
            ("completed / failed", lambda s: f"{s['completed']} / {s['failed']}"),
            ("KV exposed / E2E", lambda s: f"{100 * s['kv_exposed_share']:.3f}%"),
            ("KV exposed mean (ms)", lambda s: f"{s['kv_exposed_mean_ms']:.2f}"),
            ("KV bytes moved", lambda s: f"{s['kv_bytes'] / 2**20:.1f} MiB"),
            ("machine stalls >= 50 ms", lambda s: f"{s['machine_stalls']['count']} ({s['machine_stalls']['total_s']:.1f} s)"),
            ("token gaps >= 50 ms", lambda s: f"{s['machine_stalls']['token_gaps_ge_50ms']} "
                                              f"({s['machine_stalls']['of_them_during_a_stall']} in a stall)"),
            ("TPOT outside stalls p50/p99", lambda s: _pair_ms(s["machine_stalls"]["tpot_outside_stalls_p50"],
                                                               s["machine_stalls"]["tpot_outside_stalls_p99"])),
            ("transport", lambda s: s["transport"])]
    modes = [(m, title) for m, title in (("disagg", "disaggregated"), ("colocated", "colocated")) if m in res]
    lines = [f"{'':26}" + "".join(f" {title:>24}" for _, title in modes)]
    for name, f in rows:
        lines.append(f"{name:26}" + "".join(f" {f(res[m]):>24}" for m, _ in modes))
    return "\n".join(lines)


def _pair_ms(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "-"
    return f"{1000 * a:.1f} / {1000 * b:.1f} ({b / a:.2f}x)"


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
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="kvxfer-demo", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="12 short requests, about a minute")
    ap.add_argument("--requests", type=int, help=f"requests (default {REF['requests']}; --quick 12)")
    ap.add_argument("--rate", type=float, help=f"Poisson arrival rate, requests/s (default {REF['rate']}; --quick 2)")
    ap.add_argument("--scale", type=float, help=f"ISL/OSL scale on the seeds' statistics (default {REF['scale']}; "
                                                "--quick 0.03)")
    ap.add_argument("--pin", choices=["auto", "off"], default="auto",
                    help="auto: the disaggregated prefill and decode nodes run on disjoint halves of the CPUs (as on "
                         "two GPUs); the colocated node on all of them; off: no pinning (runs before 2026-11-30)")
    ap.add_argument("--lengths", choices=wl.LENGTHS, default="lognormal",
                    help="length distribution with the seeds' mean and sd (default lognormal; normal: clipped at the "
                         "minimum, the default before 2026-11-30)")
    ap.add_argument("--workload", help="replay a JSONL workload instead of generating one")
    ap.add_argument("--model", default="small")
    ap.add_argument("--transport", default="tcp", help="kvxfer transport between prefill and decode (default tcp)")
    ap.add_argument("--threads", type=int, default=2, help="total torch threads per deployment")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:N]: every node's model and KV cache on that GPU "
                                                    "(two nodes on one GPU move KV through CUDA IPC)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds a KV transfer may take")
    ap.add_argument("--ttft-slo", type=float, default=1.0, help="seconds (default 1.0)")
    ap.add_argument("--tpot-slo", type=float, default=0.1, help="seconds (default 0.1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--net", choices=["auto", "netns", "loopback"], default="auto",
                    help="netns: two network namespaces joined by a veth pair (root); loopback; "
                         "auto: netns if possible")
    ap.add_argument("--role", choices=["router", "prefill", "decode"],
                    help="two real hosts: run only this part (router: the workload, waits for the nodes)")
    ap.add_argument("--nodes", default="0.0.0.0:7000", help="--role router: HOST:PORT the nodes connect to")
    ap.add_argument("--connect", help="--role prefill|decode: the router's HOST:PORT")
    ap.add_argument("--iface", help="--role prefill|decode: network interface for kvxfer's tcp provider")
    ap.add_argument("--only", choices=["disagg", "colocated"], help="run one deployment (no side-by-side)")
    ap.add_argument("--trace", metavar="DIR", help="the decode/colocated nodes write a line per decode step to "
                                                   "DIR/MODE/ROLE.jsonl")
    ap.add_argument("--json", metavar="PATH", help="summary, plus every request's TTFT, TPOT and token gaps")
    ap.add_argument("--plot", metavar="PATH.png")
    ap.add_argument("--netns-inside", help=argparse.SUPPRESS)  # set by the netns runner: NS_B,ADDR_A,IFACE_A,IFACE_B
    a = ap.parse_args(argv)
    if a.role in ("prefill", "decode"):
        return _run_node(a)
    try:
        if a.netns_inside:
            ns_b, addr_a, if_a, if_b = a.netns_inside.split(",")
            net = Net("netns", f"prefill + router in netns {_netns_name()}, decode in netns {ns_b}, veth "
                      f"{if_a} <-> {if_b}", addr_a, if_a, if_b, ["ip", "netns", "exec", ns_b])
        elif a.role == "router":
            host, port = bootstrap.parse_hostport(a.nodes)
            net = Net("two-host", f"nodes connect to {host}:{port}", host, node_port=port, remote_nodes=True)
        else:
            why = netns_unavailable() if a.net in ("auto", "netns") else "--net loopback"
            if why is None:
                return run_in_netns(argv)
            if a.net == "netns":
                raise InvalidArgument(f"--net netns: {why}")
            net = Net("loopback", f"every process on 127.0.0.1 ({why})", "127.0.0.1", "lo", "lo")
        return _run_demo(a, net)
    except InvalidArgument as e:
        print(f"kvxfer-demo: error: {e}", file=sys.stderr)
        return 1


REF = {"requests": 24, "rate": 0.5, "scale": 0.04}
QUICK = {"requests": 12, "rate": 2.0, "scale": 0.03}


def _run_demo(a, net: Net) -> int:
    d = QUICK if a.quick else REF
    n, rate, scale = a.requests or d["requests"], a.rate or d["rate"], a.scale or d["scale"]
    items = wl.load_jsonl(a.workload) if a.workload else wl.generate(n, rate, scale, a.seed, lengths=a.lengths)
    print(f"kvxfer-demo: {len(items)} requests, network: {net.kind} ({net.detail})", file=sys.stderr, flush=True)
    results, outputs, timings = {}, {}, {}
    modes = ("disagg", "colocated") if a.only is None else (a.only,)
    for mode in modes:
        results[mode], outputs[mode], timings[mode] = run_mode(mode, items, a, net)
    results["tokens_match"] = outputs["disagg"] == outputs["colocated"] if a.only is None else None
    results["network"] = {"kind": net.kind, "detail": net.detail}
    results["workload"] = {"requests": len(items), "rate": None if a.workload else rate,
                           "scale": None if a.workload else scale, "lengths": None if a.workload else a.lengths,
                           "model": a.model, "threads": a.threads, "pin": node_cpus(a.pin),
                           "prompt_tokens_mean": sum(len(i.prompt) for i in items) / len(items),
                           "max_tokens_mean": sum(i.max_tokens for i in items) / len(items)}
    print(table(results))
    print(f"network: {net.kind} ({net.detail})")
    if a.only is None:
        print(f"greedy outputs identical in both deployments: {results['tokens_match']}")
    if a.json:
        per_request = {m: per_request_rows(items, ts) for m, ts in timings.items()}
        with open(a.json, "w") as f:
            json.dump({"schema": 2, **results, "per_request": per_request}, f, indent=1)
    if a.plot:
        plot(a.plot, timings)
    return 0 if results["tokens_match"] in (True, None) else 1


def per_request_rows(items: list[wl.WorkItem], timings: list[RequestTiming]) -> list[dict]:
    """What the JSON keeps of each request: enough to find where a latency tail comes from."""
    t0 = min(t.arrival for t in timings)
    rows = []
    for item, t in zip(items, timings):
        gaps = [round(1000 * g, 2) for g in t.gaps]
        rows.append({"arrival_s": round(t.arrival - t0, 3), "prompt_tokens": len(item.prompt),
                     "max_tokens": item.max_tokens, "tokens": t.tokens, "ttft_ms": _ms(t.ttft),
                     "tpot_ms": _ms(t.tpot), "gaps_ms": gaps, "error": t.error})
    return rows


def _ms(v: float | None) -> float | None:
    return None if v is None else round(1000 * v, 2)


def _run_node(a) -> int:
    from kvxfer.engine import node

    if not a.connect:
        print(f"kvxfer-demo: error: --role {a.role} needs --connect ROUTER_HOST:PORT", file=sys.stderr)
        return 2
    half = a.threads // 2 or 1
    return node.main([a.role, "--connect", a.connect, "--model", a.model, "--transport", a.transport,
                      "--timeout", str(a.timeout), "--threads", str(half if a.role == "prefill" else a.threads - half),
                      "--device", a.device, *(["--iface", a.iface] if a.iface else [])])


# ---- network namespaces ---------------------------------------------------------------------------------
def _netns_name() -> str:
    """The network namespace this process runs in (by `ip netns identify`), or '?'."""
    r = subprocess.run(["ip", "netns", "identify", str(os.getpid())], capture_output=True, text=True)
    return r.stdout.strip() or "?"


def netns_unavailable() -> str | None:
    """None when two network namespaces and a veth pair can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    probe = f"kvxprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def run_in_netns(argv: list[str]) -> int:
    """Make namespaces A and B joined by a veth pair, run this demo inside A (its decode nodes go to B), and remove
    both namespaces afterwards, whatever happens."""
    tag = f"kvx{os.getpid()}"
    ns_a, ns_b, if_a, if_b = tag + "a", tag + "b", tag + "va", tag + "vb"
    subnet = f"10.{200 + os.getpid() % 50}.{(os.getpid() // 50) % 250}"
    steps = [["ip", "netns", "add", ns_a], ["ip", "netns", "add", ns_b],
             ["ip", "link", "add", if_a, "type", "veth", "peer", "name", if_b],
             ["ip", "link", "set", if_a, "netns", ns_a], ["ip", "link", "set", if_b, "netns", ns_b],
             ["ip", "-n", ns_a, "addr", "add", f"{subnet}.1/24", "dev", if_a],
             ["ip", "-n", ns_b, "addr", "add", f"{subnet}.2/24", "dev", if_b],
             ["ip", "-n", ns_a, "link", "set", if_a, "up"], ["ip", "-n", ns_b, "link", "set", if_b, "up"],
             ["ip", "-n", ns_a, "link", "set", "lo", "up"], ["ip", "-n", ns_b, "link", "set", "lo", "up"]]
    old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup on SIGTERM too
    try:
        for cmd in steps:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise InvalidArgument(f"{' '.join(cmd)} failed: {r.stderr.strip()}; use --net loopback")
        inner = ["ip", "netns", "exec", ns_a, sys.executable, "-m", "kvxfer.engine.demo", *argv,
                 "--netns-inside", f"{ns_b},{subnet}.1,{if_a},{if_b}"]
        proc = subprocess.Popen(inner)
        try:
            return proc.wait()
        except BaseException:  # interrupted: let the inner demo stop its routers and nodes before the namespaces go
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    except InvalidArgument as e:
        print(f"kvxfer-demo: error: {e}", file=sys.stderr)
        return 1
    finally:
        for ns in (ns_a, ns_b):  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":
    raise SystemExit(main())
