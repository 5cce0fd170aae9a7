"""The two halves of a benchmark, talking JSON over one bootstrap channel (kvxfer.bootstrap).

    Driver (the sender; runs the workloads, measures, returns records)   caller: cli.run_driver
    Peer   (the receiver; owns destination pools, the TCP sink, verifies) caller: cli.run_peer

Per workload both sides create fresh agents and pools, exchange metadata, and the driver measures the same-run
limit, runs warm-up and timed transfers, then asks the peer to verify its destination bytes. Every wait is bounded
by the timeout; a peer that dies surfaces as PeerLost or TransferTimeout, never a hang.
"""
from __future__ import annotations

import collections
import os
import socket
import time
from dataclasses import dataclass

import kvxfer
from kvxfer import envs
from kvxfer.bench import limits, pools
from kvxfer.bench.workloads import FILL, Workload, allocate, fill_source, verify
from kvxfer.bootstrap import Channel
from kvxfer.errors import KvxferError, TransferFailed

PROTOCOL = 1


@dataclass
class RunConfig:
    transport: str = "auto"
    rails: int = 1
    staging: str = "auto"
    landing: str = "auto"
    interface: str | None = None
    warmup: int = 1
    iterations: int = 5
    duration_s: float | None = None
    timeout_s: float = 60.0
    verify: bool = True
    src_mem: str = "cpu"     # cpu or cuda:N, on the driver's host
    dst_mem: str = "cpu"     # on the peer's host


def _expect_ok(reply: dict) -> dict:
    if not reply.get("ok"):
        raise TransferFailed(f"peer: {reply.get('error', 'failed without a reason')}")
    return reply


# ---- peer -------------------------------------------------------------------------------------------------
class Peer:
    def __init__(self, ch: Channel, timeout_s: float, report=None):
        self.ch, self.timeout_s, self.report = ch, timeout_s, report
        self.agent = self.dst = self.workload = None
        self.sink: limits.TcpSink | None = None
        self.count = 0

    def serve(self) -> None:
        hello = self.ch.recv_json(self.timeout_s)
        if hello.get("cmd") != "hello" or hello.get("protocol") != PROTOCOL:
            self.ch.send_json({"ok": False, "error": f"protocol {hello.get('protocol')} != {PROTOCOL}; run the same "
                                                     "kvxfer version on both hosts"})
            raise TransferFailed(f"driver speaks bench protocol {hello.get('protocol')}, this peer {PROTOCOL}")
        self.sink = limits.TcpSink(self.ch._sock.getsockname()[0])
        self.ch.send_json({"ok": True, "pid": os.getpid(), "sink_port": self.sink.port, "host": _host_identity()})
        try:
            # The driver's longest silence is one timed run, itself bounded by its own timeouts; a driver that dies
            # closes the socket, which ends this wait at once.
            while self._step(self.ch.recv_json(max(600.0, 10 * self.timeout_s))):
                pass
        finally:
            self._teardown()
            self.sink.close()

    def _step(self, msg: dict) -> bool:
        cmd = msg.get("cmd")
        try:
            if cmd == "prepare":
                self._prepare(msg)
            elif cmd == "connect":
                self._connect(msg)
            elif cmd == "tcp_limit":
                self.sink.drain(int(msg["reps"]), self.timeout_s)
                self.ch.send_json({"ok": True})
            elif cmd == "verify":
                ok, why = verify(self.workload, pools.to_host(self.dst), int(msg["transfers"]))
                self.ch.send_json({"ok": True, "verified": ok, "detail": why})
            elif cmd == "results":
                if self.report:
                    self.report(msg["records"])
                self.ch.send_json({"ok": True})
            elif cmd == "bye":
                self.ch.send_json({"ok": True})
                return False
            else:
                self.ch.send_json({"ok": False, "error": f"unknown command {cmd!r}"})
        except KvxferError as e:
            self.ch.send_json({"ok": False, "error": f"{type(e).__name__}: {e}"})
        return True

    def _prepare(self, msg: dict) -> None:
        """Destination memory first, with no agent yet: the driver measures the limit on quiet cores."""
        self._teardown()
        self.count += 1
        self.workload = Workload.from_json(msg["workload"])
        where = msg.get("dst_mem", "cpu")
        pools.require(where)
        self.dst = pools.empty([a.nbytes for a in allocate(self.workload.dst_layout)], where)
        pools.fill(self.dst, FILL)
        self.ch.send_json({"ok": True, "dst_bases": pools.addresses(self.dst)})

    def _connect(self, msg: dict) -> None:
        pools.fill(self.dst, FILL)  # the limit copied into this memory; start the transfers from FILL again
        self.agent = kvxfer.Agent(f"bench-peer-{self.count}", transport=msg["transport"], interface=msg["interface"],
                                  timeout_s=self.timeout_s, rails=msg["rails"], landing=msg.get("landing", "auto"))
        self.agent.register_pool(self.dst, self.workload.dst_layout)
        self.ch.send_json({"ok": True})
        self.ch.send(self.agent.metadata())
        peer = self.agent.add_peer(self.ch.recv(self.timeout_s))
        self.agent.wait_connected(peer, self.timeout_s)
        self.ch.send_json({"ok": True, "path": peer.path})

    def _teardown(self) -> None:
        if self.agent is not None:
            self.agent.close()
        self.agent = self.dst = None


# ---- driver -----------------------------------------------------------------------------------------------
class Driver:
    def __init__(self, ch: Channel, cfg: RunConfig, progress=None):
        self.ch, self.cfg, self.progress = ch, cfg, progress or (lambda *a: None)
        self.ch.send_json({"cmd": "hello", "protocol": PROTOCOL})
        hello = _expect_ok(self.ch.recv_json(cfg.timeout_s))
        self.peer_pid, self.sink_port = hello["pid"], hello["sink_port"]
        self.same_host = hello.get("host") == _host_identity()
        self.peer_host = ch.peer.rpartition(":")[0]
        self.count = 0

    def run(self, workload: Workload) -> dict:
        cfg = self.cfg
        self.count += 1
        lay = workload.src_layout
        self.ch.send_json({"cmd": "prepare", "workload": workload.to_json(), "dst_mem": cfg.dst_mem})
        dst_bases = _expect_ok(self.ch.recv_json(max(cfg.timeout_s, 120)))["dst_bases"]
        src_host = allocate(lay)
        fill_source(src_host, workload.seed)
        src = pools.place(src_host, cfg.src_mem)
        gpu = pools.is_gpu(cfg.src_mem) or pools.is_gpu(cfg.dst_mem)
        # The limit first, before either agent's progress thread exists to share the cores with it. GPU pools on one
        # host are bounded by the device's own copy in that direction; otherwise by CMA or the wire.
        same_host_copy = self.same_host and cfg.transport in ("auto", "shm", "cma", "fi_shm") and not gpu
        if gpu and self.same_host and cfg.transport in ("auto", "shm", "cma", "cuda_ipc"):
            limit_gbps, limit_name = pools.copy_limit_gbps(workload.nbytes, cfg.src_mem, cfg.dst_mem)
        else:
            limit_gbps, limit_name = self._limit(workload, src, same_host_copy, dst_bases)
        self.ch.send_json({"cmd": "connect", "transport": cfg.transport, "interface": cfg.interface,
                           "rails": cfg.rails, "landing": cfg.landing})
        _expect_ok(self.ch.recv_json(cfg.timeout_s))
        peer_md = self.ch.recv(cfg.timeout_s)
        agent = kvxfer.Agent(f"bench-driver-{self.count}", transport=cfg.transport, interface=cfg.interface,
                             timeout_s=cfg.timeout_s, rails=cfg.rails, staging=cfg.staging)
        try:
            agent.register_pool(src, lay)
            self.ch.send(agent.metadata())
            peer = agent.add_peer(peer_md)
            agent.wait_connected(peer, cfg.timeout_s)
            _expect_ok(self.ch.recv_json(cfg.timeout_s))
            fabric, domain = agent.provider, agent.domain
            signals = "doorbell" if peer.signals == "doorbell" else fabric
            provider = agent.provider if peer.path != "cma" else f"process_vm_writev + {signals} signals"
            if not gpu and same_host_copy != (peer.path in ("cma", "fi_shm")):  # auto found no CMA: the wire's limit
                limit_gbps, limit_name = self._limit(workload, src, False, dst_bases)
            port = limits.port_rate_limit(fabric, agent.domain, envs.get("KVXFER_SYSFS"))
            if port and peer.path not in ("cma", "cuda_ipc"):  # an RDMA NIC carries it: its rate is the limit
                limit_gbps, limit_name = port
            timing = self._timed(agent, peer, workload)
            if gpu:  # the path is chosen per send from where both pools live
                provider = f"{timing['send_path']}, {signals} signals"
            verified, detail = None, "skipped (--no-verify)"
            if cfg.verify:
                self.ch.send_json({"cmd": "verify", "transfers": timing["transfers"]})
                rep = _expect_ok(self.ch.recv_json(max(cfg.timeout_s, 120)))
                verified, detail = rep["verified"], rep["detail"]
        finally:
            agent.close()
        if gpu:  # the path the sends took (cuda_ipc is chosen ahead of staging and landing)
            path = timing["send_path"]
        else:
            path = peer.path if cfg.staging == "auto" else f"staged->{peer.path}"
            if cfg.landing == "always":  # the sender stages too, and writes over the fabric into the landing slots
                path = f"staged->{fabric}->landing"
        rec = {"transport": cfg.transport, "path": path, "provider": provider, "domain": domain,
               "rails": cfg.rails, "pattern": workload.pattern, "model": workload.label,
               "nbytes": workload.nbytes, "blocks": workload.blocks, "depth": workload.depth,
               "layer_delay_ms": workload.layer_delay_ms, "limit": limit_name, "limit_gbps": limit_gbps,
               "verified": verified, "verify_detail": detail, "src_mem": cfg.src_mem, "dst_mem": cfg.dst_mem,
               "tp": ":".join(map(str, workload.tp)) if workload.tp else None}
        rec.update({k: v for k, v in timing.items() if k not in ("transfers", "send_path")})
        rec["ratio"] = rec["gbps"] / limit_gbps if limit_gbps > 0 else None
        return rec

    def finish(self, records: list[dict]) -> None:
        self.ch.send_json({"cmd": "results", "records": records})
        _expect_ok(self.ch.recv_json(self.cfg.timeout_s))
        self.ch.send_json({"cmd": "bye"})
        _expect_ok(self.ch.recv_json(self.cfg.timeout_s))

    def _limit(self, workload, src, same_host_copy: bool, dst_bases) -> tuple[float, str]:
        if same_host_copy:
            try:
                return (limits.cma_limit_gbps(workload, src, self.peer_pid, dst_bases),
                        f"process_vm_writev, one thread, same {'pieces' if workload.tp else 'chunks'}, best of 5")
            except KvxferError:
                pass  # CMA not permitted here (ptrace scope): fall back to the socket limit, and say so below
        self.ch.send_json({"cmd": "tcp_limit", "reps": limits.REPS})
        gbps = limits.tcp_limit_gbps(workload, self.peer_host, self.sink_port, limits.REPS)
        _expect_ok(self.ch.recv_json(self.cfg.timeout_s))
        return gbps, "raw TCP sendall, same bytes, best of 5"

    def _timed(self, agent, peer, workload) -> dict:
        cfg = self.cfg
        layerwise = workload.pattern == "layerwise"
        depth = 1 if layerwise else workload.depth
        inflight: collections.deque = collections.deque()
        lat, exposed = [], []
        writes = 0
        t_start = None
        i = 0
        base_id = self.count << 32

        def retire():
            s, t0, timed = inflight.popleft()
            s.wait(timeout_s=cfg.timeout_s)
            if timed:
                lat.append(time.perf_counter() - t0)

        while True:
            if i == cfg.warmup:
                while inflight:
                    retire()
                t_start = time.perf_counter()
            timed_done = i - cfg.warmup
            if t_start is not None:
                if cfg.duration_s is not None:
                    if timed_done >= 3 and time.perf_counter() - t_start >= cfg.duration_s:
                        break
                elif timed_done >= cfg.iterations:
                    break
            while len(inflight) >= depth:
                retire()
            src_ids, dst_ids = workload.ids_for(i)
            t0 = time.perf_counter()
            s = agent.send(peer, base_id + i, src_ids, dst_ids)
            writes = s.num_writes
            if layerwise:
                for layer in range(workload.kv_layout.num_layers):
                    _busy_wait(workload.layer_delay_ms / 1e3)  # stands in for computing this layer
                    s.layer_ready(layer)
                t_last = time.perf_counter()
                s.wait(timeout_s=cfg.timeout_s)
                if t_start is not None:
                    exposed.append(time.perf_counter() - t_last)
                    lat.append(time.perf_counter() - t0)
            else:
                s.all_ready()
                inflight.append((s, t0, t_start is not None))
            i += 1
            if t_start is not None:
                self.progress(timed_done + 1)
        while inflight:
            retire()
        elapsed = time.perf_counter() - t_start
        n = len(lat)
        out = {"transfers": i, "iterations": n, "writes_per_transfer": writes, "send_path": s.path,
               "gbps": workload.nbytes * n / elapsed / 1e9, "msgs_per_s": n / elapsed,
               "writes_per_s": writes * n / elapsed,
               "p50_us": _pct(lat, 50) * 1e6, "p99_us": _pct(lat, 99) * 1e6}
        if layerwise:
            out["exposed_p50_us"] = _pct(exposed, 50) * 1e6
            out["compute_ms"] = workload.layer_delay_ms * workload.kv_layout.num_layers
        return out


def _host_identity() -> str:
    """hostname + boot id: equal on both sides exactly when they share a kernel (so CMA can work)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _pct(values, p) -> float:
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def _busy_wait(seconds: float) -> None:
    end = time.perf_counter() + seconds
    if seconds > 0.002:
        time.sleep(seconds - 0.001)
    while time.perf_counter() < end:
        pass
