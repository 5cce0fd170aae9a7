"""kvxfer-compare: kvxfer against NIXL and Mooncake's Transfer Engine on the same request, in the same run.

    kvxfer-compare                         every library importable here, over TCP on loopback, the reference
                                           request (Llama-3-8B, 4096 tokens, 16-token blocks: 512 MiB in 16,384
                                           chunks of 32 KiB, random block ids) 5 times, then 1-block requests
    kvxfer-compare --libraries kvxfer,nixl --peer-python /path/to/venv/bin/python

Each library runs as sender and receiver in two processes of its own (drive_<library>.py), used the way the
serving engines that ship it use it (see each driver's docstring). A request's time runs from the sender starting
it to the receiver knowing every byte landed (kvxfer: its recv DONE; NIXL and Mooncake: their notification), and
every request's destination bytes are checked. Ratios are to a limit measured in the same run: over tcp one raw
TCP stream of the same bytes between two processes; over host (one host, each library's best path) one core's
memcpy of them. NIXL and Mooncake load only in their processes, under --peer-python, never next to kvxfer.

Exit status: 0 every library asked for ran and moved every byte right, 1 one did not (one line says why), 2 bad
arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict

import numpy as np

from kvxfer.bench.compare.request import Request

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT_PEERS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(HERE))), ".venv-peers", "bin", "python")
LIBRARIES = ("kvxfer", "nixl", "mooncake")
PEER_LIBRARIES = {  # import probe, what to install
    "nixl": (("import importlib, sys\nfor m in ('nixl._api', 'nixl_cu12._api', 'nixl_cu13._api'):\n"
              "    try:\n        importlib.import_module(m); sys.exit(0)\n    except ImportError as e: err = e\n"
              "sys.exit(str(err))"), "pip install nixl-cu12"),
    "mooncake": ("import mooncake.engine", "pip install mooncake-transfer-engine-non-cuda (or a CUDA build)"),
}
# What each library runs over in each setting: driver options and environment. On one host NIXL takes UCX's own
# choice of transports, and Mooncake tcp, its only one without an RDMA NIC; each row's path says what ran.
OVER = {
    "tcp": {"kvxfer": ({"transport": "tcp"}, {}),
            "nixl": ({}, {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"}),
            "mooncake": ({"protocol": "tcp"}, {}),
            "limit": "one TCP stream of the same bytes"},
    "host": {"kvxfer": ({"transport": "auto"}, {}),
             "nixl": ({}, {}),
             "mooncake": ({"protocol": "tcp"}, {}),
             "limit": "one core's memcpy of the same bytes"},
}


class CompareError(Exception):
    pass


class DriverProcess:
    """One library half (send or recv) in its own process, spoken to in JSON lines."""

    def __init__(self, label, python, script, role, req, timeout_s, options, env, log_dir, verify=True):
        self.label, self.role, self.timeout_s = label, role, timeout_s
        self.who = {"send": "sender", "recv": "receiver"}[role]
        self.log_path = os.path.join(log_dir, f"{label}-{role}.log")
        cmd = [python, os.path.join(HERE, script), "--role", role, "--request", req.to_json(),
               "--timeout", str(timeout_s)] + [f"--option={k}={v}" for k, v in options.items()]
        if not verify:
            cmd.append("--no-verify")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                         env=env, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def tell(self, **msg) -> None:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise CompareError(self._died()) from None

    def expect(self, key: str) -> dict:
        try:
            line = self.lines.get(timeout=self.timeout_s)
        except queue.Empty:
            raise CompareError(f"{self.label} {self.who} said nothing for {self.timeout_s:g} s (log: "
                               f"{self.log_path})") from None
        if line is None:
            raise CompareError(self._died())
        msg = json.loads(line)
        if "error" in msg:
            raise CompareError(f"{self.label} {self.who}: {msg['error']} (log: {self.log_path})")
        if key not in msg:
            raise CompareError(f"{self.label} {self.who} answered {msg} where {key!r} was due")
        return msg

    def _died(self) -> str:
        rc = self.proc.wait(timeout=10)
        with open(self.log_path) as f:
            tail = [ln.rstrip() for ln in f.readlines()[-3:]]
        return f"{self.label} {self.who} exited with status {rc}: {' | '.join(tail)} (log: {self.log_path})"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.tell(op="quit")
                self.proc.wait(timeout=10)
            except (CompareError, subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()


def peer_library_missing(lib: str, python: str) -> str:
    """'' if `python` can import the library, else why not and what to do."""
    probe, install = PEER_LIBRARIES[lib]
    try:
        r = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    except OSError as e:
        return f"cannot run {python}: {e}"
    if r.returncode == 0:
        return ""
    why = (r.stderr.strip().splitlines() or ["import failed"])[-1]
    return f"not importable by {python} ({why}): {install} there, or give --peer-python a Python that has it"


def memcpy_seconds(nbytes: int, reps: int = 5) -> float:
    """Best of reps one-thread copies of nbytes between two faulted-in buffers."""
    src, dst = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return best


class Comparison:
    def __init__(self, req: Request, over: str, reps: int, small_reps: int, timeout_s: float, peer_python: str,
                 log_dir: str, say, options: dict | None = None, layer_ms: float | None = None):
        self.req, self.over, self.reps, self.small_reps = req, over, reps, small_reps
        self.layer_ms = layer_ms  # None: whole requests; else layer by layer after layer_ms of compute each
        self.options = options or {}
        self.timeout_s, self.peer_python, self.log_dir, self.say = timeout_s, peer_python, log_dir, say

    def run_library(self, lib: str) -> dict:
        """Both halves of lib (or of the limit, over tcp), as this comparison runs it."""
        env = {**os.environ, "FI_TCP_IFACE": os.environ.get("FI_TCP_IFACE", "lo")}
        if lib == "limit":
            return self.run_pair(lib, sys.executable, "drive_tcp.py", {}, env, verify=False)
        options, extra_env = OVER[self.over][lib]
        options = {**options, **self.options.get(lib, {})}
        python = sys.executable if lib == "kvxfer" else self.peer_python
        return self.run_pair(lib, python, f"drive_{lib}.py", options, {**env, **extra_env}, verify=True)

    def run_pair(self, lib: str, python: str, script: str, options: dict, env: dict, verify: bool) -> dict:
        """Starts both halves, connects them, runs one untimed request, `reps` full and `small_reps` 1-block ones
        (the full ones layer by layer with --layer-ms, except for the limit, which is a bandwidth)."""
        layer_ms = None if lib == "limit" else self.layer_ms
        halves = [DriverProcess(lib, python, script, role, self.req, self.timeout_s, options, env, self.log_dir,
                                verify) for role in ("recv", "send")]
        recv, send = halves
        try:
            started = time.perf_counter()
            addresses = [h.expect("address")["address"] for h in halves]
            recv.tell(op="connect", peer=addresses[1])
            send.tell(op="connect", peer=addresses[0])
            about = {**recv.expect("connected").get("about", {}), **send.expect("connected").get("about", {})}
            setup_s = time.perf_counter() - started

            def one(rid: int, blocks: int, clear: str, verify: str, layer_ms=None) -> dict:
                recv.tell(op="arm", rid=rid, blocks=blocks, clear=clear, verify=verify, layers=layer_ms is not None)
                recv.expect("armed")
                send.tell(op="go", rid=rid, blocks=blocks, layer_ms=layer_ms)
                s, r = send.expect("t0"), recv.expect("t1")
                if r["bad"]:
                    raise CompareError(f"{lib}: request {rid} ({blocks} blocks) landed wrong: {r['bad']}")
                out = {"s": (r["t1"] - s["t0"]) / 1e9, "sender_s": (s["sent"] - s["t0"]) / 1e9,
                       "send_cpu_s": s["cpu_s"], "recv_cpu_s": r["cpu_s"],
                       "send_counters": s.get("counters", {}), "recv_counters": r.get("counters", {})}
                if layer_ms is not None:  # s: all the transfer added to the forward (see driver.LayerClock)
                    out.update(total_s=(r["t1"] - s["start"]) / 1e9, compute_s=s["compute"] / 1e9, tail_s=out["s"],
                               s=(r["t1"] - s["start"] - s["compute"]) / 1e9)
                return out

            one(1, self.req.req_blocks, "all", "all", layer_ms)  # untimed: connections, first use of all
            full = []
            for i in range(self.reps):
                full.append(one(10 + i, self.req.req_blocks, "all", "all", layer_ms))
                self.say(f"  {lib}: request {i + 1}/{self.reps}: " + (
                    f"{self.req.nbytes / full[-1]['s'] / 1e9:.2f} GB/s" if layer_ms is None else
                    f"{full[-1]['s'] * 1e3:.2f} ms added to {full[-1]['compute_s'] * 1e3:.0f} ms of compute"))
            small = [one(1000 + i, 1, "all" if i == 0 else "request", "all" if i == self.small_reps - 1 else
                         "request") for i in range(self.small_reps)]
            return {"library": lib, "about": about, "setup_s": setup_s, "full": full, "small": small}
        finally:
            for h in halves:
                h.stop()

    def summarize(self, raw: dict, limit_s: float) -> dict:
        full_s = statistics.median(r["s"] for r in raw["full"])
        small = sorted(r["s"] for r in raw["small"]) or [float("nan")]
        gb = self.req.nbytes / 1e9
        return {
            "library": raw["library"], "over": self.over, **raw["about"], "gbps": gb / full_s,
            "ratio": limit_s / full_s, "full_s": [r["s"] for r in raw["full"]],
            "counters": [{"send": r["send_counters"], "recv": r["recv_counters"]} for r in raw["full"]],
            **({} if self.layer_ms is None else {k: [r[k] for r in raw["full"]] for k in ("total_s", "compute_s",
                                                                                         "tail_s")}),
            "small_s": [r["s"] for r in raw["small"]], "small_sender_s": [r["sender_s"] for r in raw["small"]],
            "small_ms_p50": small[len(small) // 2] * 1e3, "small_ms_p99": small[min(len(small) - 1,
                                                                                     int(len(small) * 0.99))] * 1e3,
            "send_cpu_s_per_gb": statistics.mean(r["send_cpu_s"] for r in raw["full"]) / gb,
            "recv_cpu_s_per_gb": statistics.mean(r["recv_cpu_s"] for r in raw["full"]) / gb,
            "setup_s": raw["setup_s"], "verified": True,
        }


def ideal_exposed_s(req: Request, link_s: float, layer_s: float) -> float:
    """What a transfer layer by layer adds to a forward of layer_s per layer over a link that moves the whole request
    in link_s and costs the forward nothing: layer k's bytes leave from the end of its compute, the link moves them
    in order, and the forward ends at num_layers * layer_s."""
    n, per_layer = req.num_layers, link_s / req.num_layers
    return max((k - n) * layer_s + (n - k + 1) * per_layer for k in range(1, n + 1))


def table(req: Request, over: str, limit: dict, rows: list[dict], missing: dict, layer_ms=None) -> str:
    head = (f"the reference request: {req.num_layers} layers x K,V x {req.req_blocks} random blocks of "
            f"{req.chunk_bytes // 1024} KiB = {req.chunks:,} chunks, {req.nbytes / 2**20:.0f} MiB; over {over}\n")
    if layer_ms is None:
        head += f"limit: {limit['name']}: {limit['gbps']:.2f} GB/s (same run)\n"
        first = "GB/s"
    else:
        head += (f"layer by layer, {layer_ms:g} ms of compute per layer; 'exposed': from the forward's start to the "
                 f"receiver knowing all landed, less the compute (the library's work in the forward's thread "
                 f"counts); limit: {limit['name']}: {limit['s'] * 1e3:.2f} ms exposed (same run)\n")
        first = "exp. ms"
    lines = [(f"{'library':9} {'version':14} {'path':26} {first:>7} {'ratio':>6} {'1-block p50/p99 ms':>19} "
              f"{'CPU s/GB send/recv':>19}")]
    for r in rows:
        value = r["gbps"] if layer_ms is None else statistics.median(r["full_s"]) * 1e3
        lines.append(f"{r['library']:9} {r.get('version', '?'):14} {r.get('path', '?'):26} {value:7.2f} "
                     f"{r['ratio']:6.2f} {r['small_ms_p50']:9.2f}/{r['small_ms_p99']:<9.2f} "
                     f"{r['send_cpu_s_per_gb']:9.2f}/{r['recv_cpu_s_per_gb']:<9.2f}")
    for lib, why in missing.items():
        lines.append(f"{lib:9} {why if why.startswith('failed') else 'not run: ' + why}")
    return head + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvxfer-compare", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__[__doc__.index("\n"):])
    ap.add_argument("--libraries", default="all",
                    help=f"comma-separated, of {','.join(LIBRARIES)}; all: kvxfer and those --peer-python can "
                         "import (default: all)")
    ap.add_argument("--over", choices=sorted(OVER), default="tcp",
                    help="tcp: every library over TCP sockets on loopback, against one raw TCP stream; host: each "
                         "library's own best path between two processes of this host, against one core's memcpy "
                         "(default: tcp)")
    ap.add_argument("--peer-python", default=None,
                    help="the Python that runs NIXL and Mooncake (default: $KVXFER_PEER_PYTHON, else this "
                         "checkout's .venv-peers made by scripts/setup_peers.sh, else this Python)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of the request (default: 4096)")
    ap.add_argument("--layers", type=int, default=32, help="(default: 32, Llama-3-8B)")
    ap.add_argument("--kv-heads", type=int, default=8, help="(default: 8)")
    ap.add_argument("--head-dim", type=int, default=128, help="(default: 128)")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    ap.add_argument("--layer-ms", type=float, default=None, metavar="MS",
                    help="move the full request layer by layer, each layer's bytes once MS of emulated compute (a "
                         "sleep) for it ended, and report the time the transfer adds to the forward: until the "
                         "receiver has every layer, less the compute (default: whole requests)")
    ap.add_argument("--iters", type=int, default=5, help="timed full requests per library (default: 5)")
    ap.add_argument("--small-iters", type=int, default=30, help="timed 1-block requests per library (default: 30)")
    ap.add_argument("--timeout", type=float, default=120.0, help="bound on every wait, seconds (default: 120)")
    ap.add_argument("--option", action="append", default=[], metavar="LIB:KEY=VALUE",
                    help="a setting for one library's driver (see its drive_<lib>.py), e.g. nixl:num_threads=0 or "
                         "mooncake:batch=2048 or kvxfer:transport=ucx; repeatable")
    ap.add_argument("--json", metavar="PATH", help="write the rows here")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


def parse(argv=None) -> tuple[argparse.Namespace, Request, list[str]]:
    ap = build_parser()
    a = ap.parse_args(argv)
    for flag, value in (("--tokens", a.tokens), ("--layers", a.layers), ("--kv-heads", a.kv_heads),
                        ("--head-dim", a.head_dim), ("--block-size", a.block_size), ("--iters", a.iters),
                        ("--small-iters", a.small_iters)):
        if value < 1:
            ap.error(f"{flag} {value} must be >= 1")
    if a.timeout <= 0:
        ap.error(f"--timeout {a.timeout} must be > 0")
    if a.layer_ms is not None and not 0 <= a.layer_ms <= 1000:
        ap.error(f"--layer-ms {a.layer_ms} must be between 0 and 1000")
    libs = list(LIBRARIES) if a.libraries == "all" else [x.strip() for x in a.libraries.split(",") if x.strip()]
    unknown = [x for x in libs if x not in LIBRARIES]
    if unknown or not libs:
        ap.error(f"--libraries {a.libraries!r}: unknown {unknown}; choose from {','.join(LIBRARIES)} or all")
    blocks = -(-a.tokens // a.block_size)
    req = Request(num_layers=a.layers, pool_blocks=2 * blocks, req_blocks=blocks, block_tokens=a.block_size,
                  kv_heads=a.kv_heads, head_dim=a.head_dim)
    try:
        req.check()
    except ValueError as e:
        ap.error(str(e))
    a.options = {lib: {} for lib in LIBRARIES}
    for text in a.option:
        lib, _, setting = text.partition(":")
        key, eq, value = setting.partition("=")
        if lib not in LIBRARIES or not eq or not key:
            ap.error(f"--option {text!r}: give LIB:KEY=VALUE with LIB one of {','.join(LIBRARIES)}")
        a.options[lib][key] = value
    if a.peer_python is None:
        a.peer_python = os.environ.get("KVXFER_PEER_PYTHON") or (
            CHECKOUT_PEERS if os.path.exists(CHECKOUT_PEERS) else sys.executable)
    return a, req, libs


def main(argv=None) -> int:
    a, req, libs = parse(argv)
    say = (lambda line: None) if a.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    missing = {lib: why for lib in libs if lib in PEER_LIBRARIES
               for why in [peer_library_missing(lib, a.peer_python)] if why}
    explicit = a.libraries != "all"
    log_dir = tempfile.mkdtemp(prefix="kvxfer-compare-")  # the drivers' logs: kept when a run fails
    cmp = Comparison(req, a.over, a.iters, a.small_iters, a.timeout, a.peer_python, log_dir, say, a.options,
                     a.layer_ms)
    try:
        if a.over == "tcp":
            say("kvxfer-compare: the limit (one TCP stream) ...")
            raw = cmp.run_library("limit")
            limit_s = statistics.median(r["s"] for r in raw["full"])
        else:
            say("kvxfer-compare: the limit (one core's memcpy) ...")
            limit_s = memcpy_seconds(req.nbytes)
        limit = {"gbps": req.nbytes / limit_s / 1e9, "s": limit_s, "name": OVER[a.over]["limit"]}
        if a.layer_ms is not None:  # the time added on a link of the limit's speed that costs the forward nothing
            limit_s = ideal_exposed_s(req, limit_s, a.layer_ms / 1e3)
            limit.update(s=limit_s, name=f"{limit['name']} at {limit['gbps']:.2f} GB/s, fed each layer as its "
                                         "compute ends, costing the forward nothing")
    except CompareError as e:
        print(f"kvxfer-compare: error: the limit: {e}", file=sys.stderr)
        return 1
    rows, failed = [], {}
    for lib in libs:
        if lib in missing:
            say(f"kvxfer-compare: {lib}: not run: {missing[lib]}")
            continue
        say(f"kvxfer-compare: {lib} over {a.over} ...")
        try:
            rows.append(cmp.summarize(cmp.run_library(lib), limit_s))
        except CompareError as e:
            failed[lib] = f"failed: {e}"
            print(f"kvxfer-compare: error: {e}", file=sys.stderr)
    if not failed:
        shutil.rmtree(log_dir, ignore_errors=True)
    print(table(req, a.over, limit, rows, {**missing, **failed}, a.layer_ms))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"schema": 1, "kind": "compare", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "request": asdict(req), "over": a.over, "layer_ms": a.layer_ms, "options": a.options,
                       "limit": limit, "rows": rows,
                       "not_run": {**missing, **failed}},
                      f, indent=1)
    if explicit and missing:
        for lib, why in missing.items():
            print(f"kvxfer-compare: error: {lib} was asked for and is {why}", file=sys.stderr)
    return 1 if failed or (explicit and missing) else 0


if __name__ == "__main__":
    sys.exit(main())
