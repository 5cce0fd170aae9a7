"""Same-run limits: what the bytes of a workload cost to move without kvxfer, between the same two processes.

    same host, host memory : one thread's process_vm_writev of the same chunks into the same destination addresses
                             (between TP ranks: of the same pieces, the plan's writes)
    tcp (and other wires)  : raw TCP, one sendall of the same bytes to the peer process, acked after the last byte
    efa, verbs             : the NIC's port rate from sysfs, where it says (raw TCP may not even cross that NIC)

Small transfers are repeated until about 64 MiB moved, so one timing is not a single syscall. The limit is the
best of 5 timings: a limit is what the machine can do, and the best run is the least disturbed one.
"""
from __future__ import annotations

import socket
import threading
import time

import numpy as np

from kvxfer import _C, topology
from kvxfer.errors import PeerLost
from kvxfer.bench.workloads import Workload, chunk_rows

TARGET_BYTES = 64 << 20
REPS = 5


def repeats(workload: Workload) -> int:
    return max(1, TARGET_BYTES // max(1, workload.nbytes))


def cma_limit_gbps(workload: Workload, src: list[np.ndarray], peer_pid: int, dst_bases: list[int], reps: int = REPS) -> float:
    """process_vm_writev of the same chunks (the rotating sweep: the same block, repeated)."""
    lay = workload.kv_layout
    k = repeats(workload)
    if workload.tp:
        s, d, n = _plan_addresses(workload, src, dst_bases)
        seconds = min(_C.cma_copy_seconds(peer_pid, np.tile(s, k), np.tile(d, k), np.tile(n, k)) for _ in range(reps))
        return workload.nbytes * k / seconds / 1e9
    s_addr, d_addr = [], []
    # Transfer i of the run addresses ids_for(i): the sweep rotates over `depth` buffers, so the limit does too
    # (copying one small buffer k times would run from cache and overstate the limit).
    for i in range(k if workload.rotate else 1):
        src_ids, dst_ids = workload.ids_for(i)
        for (sr, srows), (dr, drows) in zip(chunk_rows(lay, src_ids), chunk_rows(lay, dst_ids)):
            s_addr.append(np.uint64(src[sr].ctypes.data) + srows.astype(np.uint64) * np.uint64(lay.chunk_bytes))
            d_addr.append(np.uint64(dst_bases[dr]) + drows.astype(np.uint64) * np.uint64(lay.chunk_bytes))
    tiles = 1 if workload.rotate else k  # the rotating sweep already listed k transfers' chunks
    s = np.ascontiguousarray(np.tile(np.concatenate(s_addr), tiles))
    d = np.ascontiguousarray(np.tile(np.concatenate(d_addr), tiles))
    n = np.full(s.size, lay.chunk_bytes, np.uint64)
    seconds = min(_C.cma_copy_seconds(peer_pid, s, d, n) for _ in range(reps))
    return workload.nbytes * k / seconds / 1e9


def _plan_addresses(workload: Workload, src: list[np.ndarray], dst_bases: list[int]):
    """(source addresses, destination addresses, sizes) of the writes kvxfer's plan makes for one transfer."""
    def spec(lay):
        if lay.per_layer:
            return lay.spec(range(lay.num_layers), [0] * lay.num_layers)
        return lay.spec([0] * lay.num_layers, [i * lay.layer_stride for i in range(lay.num_layers)])

    src_ids, dst_ids = workload.ids_for(0)
    sl, dl = workload.src_layout, workload.dst_layout
    p = _C.build_plan(spec(sl), spec(dl), src_ids, dst_ids, 0, sl.num_layers, 1 << 30)
    s_base = np.array([a.ctypes.data for a in src], np.uint64)
    d_base = np.array(dst_bases, np.uint64)
    s = np.ascontiguousarray(s_base[p["src_region"]] + p["src_offset"])
    d = np.ascontiguousarray(d_base[p["dst_region"]] + p["dst_offset"])
    return s, d, np.ascontiguousarray(p["nbytes"].astype(np.uint64))


def port_rate_limit(provider: str, domain: str, sysfs: str = "/sys") -> tuple[float, str] | None:
    """(GB/s, name) of the RDMA NIC an efa/verbs agent opened (its libfabric domain), from its fastest port's rate;
    None for other providers or when sysfs does not list the device's rate."""
    if provider.split(";")[0] not in ("efa", "verbs"):
        return None
    device = topology.device_of(domain)
    for nic in topology.rdma_nics(sysfs):
        if nic.name == device and nic.rate_gbps:
            return nic.rate_gbps / 8, f"{device}'s port rate ({nic.rate_gbps:g} Gb/s, sysfs)"
    return None


def tcp_limit_gbps(workload: Workload, host: str, port: int, reps: int = REPS) -> float:
    """sendall of the same bytes (repeated for small ones) to the peer's sink, which acks the last byte. One
    connection for every rep, so the later reps run on a warmed-up socket, as kvxfer's long-lived one does."""
    try:
        return _tcp_limit_gbps(workload, host, port, reps)
    except OSError as e:  # the peer died or the link dropped while we measured the limit
        raise PeerLost(f"the peer's raw-TCP limit sink at {host}:{port} went away ({e}); the peer process exited "
                       "or the network dropped") from None


def _tcp_limit_gbps(workload: Workload, host: str, port: int, reps: int) -> float:
    total = workload.nbytes * repeats(workload)
    buf = np.ones(min(total, 256 << 20), np.uint8)
    times = []
    with socket.create_connection((host, port), timeout=60) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(reps):
            t0 = time.perf_counter()
            s.sendall(total.to_bytes(8, "little"))
            left = total
            while left:
                n = min(left, buf.nbytes)
                s.sendall(memoryview(buf)[:n])
                left -= n
            if s.recv(1) != b"k":
                raise ConnectionError("the peer's TCP sink did not ack")
            times.append(time.perf_counter() - t0)
    return total / min(times) / 1e9


class TcpSink:
    """The peer's side of tcp_limit_gbps: one connection, `reps` length-prefixed messages, each acked."""

    def __init__(self, host: str):
        self._sock = socket.create_server((host, 0))
        self.port = self._sock.getsockname()[1]
        self._buf = bytearray(8 << 20)

    def drain(self, reps: int, timeout_s: float) -> None:
        self._sock.settimeout(timeout_s)
        conn, _ = self._sock.accept()
        with conn:
            conn.settimeout(timeout_s)
            view = memoryview(self._buf)
            for _ in range(reps):
                total = int.from_bytes(_read_exact(conn, 8), "little")
                while total:
                    n = conn.recv_into(view, min(total, len(self._buf)))
                    if not n:
                        raise ConnectionError("the driver closed the TCP limit connection early")
                    total -= n
                conn.sendall(b"k")

    def close(self) -> None:
        self._sock.close()


def _read_exact(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise ConnectionError("the driver closed the TCP limit connection early")
        out += chunk
    return out


def memcpy_gbps(nbytes: int) -> float:
    """One thread copying nbytes in this process (numpy), best of 3."""
    a, b = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def loopback_tcp_gbps(nbytes: int) -> float:
    """sendall of nbytes from this thread to a sink thread over 127.0.0.1, acked after the last byte; best of 3."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    sink_error = []

    def sink():
        try:
            conn, _ = server.accept()
            with conn:
                view = memoryview(bytearray(8 << 20))
                for _ in range(3):
                    left = nbytes
                    while left:
                        n = conn.recv_into(view, min(left, len(view)))
                        if not n:
                            raise ConnectionError("closed early")
                        left -= n
                    conn.sendall(b"k")
        except OSError as e:
            sink_error.append(e)

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    buf, best = memoryview(np.ones(nbytes, np.uint8)), float("inf")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            for _ in range(3):
                t0 = time.perf_counter()
                s.sendall(buf)
                if s.recv(1) != b"k":
                    raise ConnectionError(f"the raw TCP sink did not ack ({sink_error})")
                best = min(best, time.perf_counter() - t0)
    finally:
        server.close()
        t.join(5)
    return nbytes / best / 1e9
