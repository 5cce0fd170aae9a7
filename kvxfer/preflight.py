"""Preflight: before serving, move one paged request through the fabric this host would use, on every NIC, and
compare its bandwidth with a limit measured in the same run.

    python -m kvxfer preflight [--transport auto] [--interface IF] [--rails N] [--mib 64] [--json PATH]
    kvxfer.preflight.run() -> [Check]            (an engine can call it at boot)

Two agents in this process are connected over the fabric (named explicitly, so the same-host cma path does not
stand in for it), a request of the Llama-3-8B chunk shape with random block ids is written layer by layer and
verified byte for byte (addressed blocks equal the source, every other block keeps its guard bytes), and the best
of a few timed transfers is reported as a ratio to the limit for that wire: the NIC's port rate for efa/verbs (one
check per RDMA NIC sysfs lists), raw TCP between two sockets of this process for tcp, memcpy for shm. A ratio
under 0.1 (10x slower than the limit) fails the check: a path that slow is a misconfiguration (an emulated RDMA
path, the wrong interface), not a tuning question. Loopback measures this host's half of the path only; the wire
between hosts is kvxfer-bench's job (`kvxfer-bench --listen` / `--connect`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from kvxfer import envs, topology
from kvxfer.bench import limits
from kvxfer.errors import InvalidArgument, KvxferError

SLOW_RATIO = 0.1
_FABRICS = ("tcp", "fi_shm", "efa", "verbs", "ucx")


@dataclass
class Check:
    transport: str          # the fabric checked: tcp, fi_shm, efa, verbs or ucx
    provider: str           # what it opened ("tcp;ofi_rxm", "efa", "ucx 1.13.1")
    interface: str          # the NIC or interface ("" = the provider's first)
    rails: int
    nbytes: int
    gbps: float             # best of the timed transfers, GB/s
    limit: str              # what the ratio is taken against
    limit_gbps: float       # 0 when unknown
    ratio: float            # gbps / limit_gbps (0 when the limit is unknown)
    memcpy_gbps: float      # this host's memcpy of the same bytes, for scale
    ok: bool
    why: str

    def line(self) -> str:
        where = f" on {self.interface}" if self.interface else ""
        limit = (f"{self.ratio:.2f} of {self.limit} ({self.limit_gbps:.2f} GB/s)" if self.limit_gbps else
                 f"no limit known ({self.limit})")
        return (f"{'ok  ' if self.ok else 'FAIL'} {self.transport}{where} ({self.provider}, {self.rails} rail(s)): "
                f"{self.nbytes >> 20} MiB verified at {self.gbps:.2f} GB/s = {limit}; memcpy {self.memcpy_gbps:.1f} "
                f"GB/s{'' if self.ok else ' -- ' + self.why}")


def _fabric_of(transport: str) -> str:
    """The fabric an agent of `transport` uses for peers on other hosts (what auto opens, when asked for auto)."""
    from kvxfer import Agent

    if transport in _FABRICS:
        return transport
    with Agent("kvxfer-preflight-probe", transport=transport, peer_timeout_s=0) as probe:
        return probe.transport


def _interfaces(fabric: str, interface: str | None) -> list[tuple[str, float, str]]:
    """(interface, limit GB/s, limit name) per check: every RDMA NIC for efa/verbs, else the one interface."""
    if interface or fabric not in ("efa", "verbs"):
        return [(interface or "", 0.0, "")]
    nics = topology.rdma_nics(envs.get("KVXFER_SYSFS"))
    if not nics:
        return [("", 0.0, "the NIC's port rate, which sysfs does not list")]
    return [(topology.domain_name(n.name, fabric), n.rate_gbps / 8, f"{n.name}'s port rate") for n in nics]


def _layout(mib: int):
    from kvxfer import KVLayout

    blocks = max(2, (mib << 20) // (8 * 64 << 10))  # 8 layers of K+V chunks of 32 KiB (Llama-3-8B, 16 tokens)
    return KVLayout.vllm_flash(8, blocks, 16, 8, 128, "float16"), KVLayout.vllm_flash(8, 2 * blocks, 16, 8, 128,
                                                                                         "float16")


def _agent_pair(fabric: str, interface: str, rails: int, timeout_s: float):
    from kvxfer import Agent

    kw = {"transport": fabric, "interface": interface or None, "rails": rails, "timeout_s": timeout_s,
          "peer_timeout_s": 0}
    a, b = Agent("kvxfer-preflight-a", **kw), Agent("kvxfer-preflight-b", **kw)
    return a, b


def check(fabric: str, interface: str = "", rails: int = 1, mib: int = 64, limit_gbps: float = 0.0,
          limit: str = "", timeout_s: float = 30.0, reps: int = 3) -> Check:
    """One verified loopback request over `fabric` on `interface`; see the module docstring."""
    src_layout, dst_layout = _layout(mib)
    rng = np.random.default_rng(0x6b7678)
    src = [rng.integers(0, 256, src_layout.tensor_layer_bytes, dtype=np.uint8) for _ in range(8)]
    dst = [np.full(dst_layout.tensor_layer_bytes, 0xA5, np.uint8) for _ in range(8)]
    nb, c = src_layout.num_blocks, src_layout.chunk_bytes
    src_ids = rng.permutation(nb).astype(np.int32)
    dst_ids = rng.choice(2 * nb, nb, replace=False).astype(np.int32)  # the rest of dst are guard blocks
    a, b = _agent_pair(fabric, interface, rails, timeout_s)
    try:
        a.register_pool(src, src_layout)
        b.register_pool(dst, dst_layout)
        to_b, to_a = a.add_peer(b.metadata()), b.add_peer(a.metadata())
        a.wait_connected(to_b, timeout_s)
        b.wait_connected(to_a, timeout_s)
        best = float("inf")
        for i in range(reps + 1):  # the first warms the connection and the registrations up
            recv = b.recv(to_a, i + 1, dst_ids, timeout_s=timeout_s)
            t0 = time.perf_counter()
            send = a.send(to_b, i + 1, src_ids, dst_ids)
            send.all_ready()
            recv.wait(timeout_s=timeout_s)
            if i:
                best = min(best, time.perf_counter() - t0)
            send.wait(timeout_s=timeout_s)
        provider, rails_used = a.provider, a.rails
    finally:
        a.close()
        b.close()
    bad = _mismatch(src, dst, nb, c, src_ids, dst_ids)
    nbytes = src_layout.total_bytes
    gbps = nbytes / best / 1e9
    memcpy = limits.memcpy_gbps(nbytes)
    if not limit:
        limit, limit_gbps = (("raw TCP over 127.0.0.1", limits.loopback_tcp_gbps(nbytes)) if fabric in ("tcp", "ucx") else
                             ("memcpy", memcpy))
    ratio = gbps / limit_gbps if limit_gbps else 0.0
    why = bad or (f"{ratio:.3f} of {limit}: more than {1 / SLOW_RATIO:.0f}x slower than the limit (an emulated or "
                  "misrouted path: check `python -m kvxfer info`)" if limit_gbps and ratio < SLOW_RATIO else "")
    return Check(fabric, provider, interface, rails_used, nbytes, gbps, limit, limit_gbps, ratio, memcpy, not why, why)


def _mismatch(src, dst, nb, c, src_ids, dst_ids) -> str:
    """'' when every addressed block equals its source and every other block still holds its guard bytes."""
    guard = np.ones(2 * nb, bool)
    guard[dst_ids] = False
    for layer, (s, d) in enumerate(zip(src, dst)):
        sv, dv = s.reshape(2, nb, c), d.reshape(2, 2 * nb, c)
        if not np.array_equal(dv[:, dst_ids], sv[:, src_ids]):
            return f"layer {layer}: addressed blocks differ from their source after the transfer (data corrupted)"
        if not (dv[:, guard] == 0xA5).all():
            return f"layer {layer}: bytes outside the addressed blocks changed (a write landed out of place)"
    return ""


def run(transport: str | None = None, interface: str | None = None, rails: int | None = None, mib: int = 64,
        progress=None) -> list[Check]:
    """A check per NIC of the fabric `transport` (None: KVXFER_TRANSPORT, auto) uses for peers on other hosts."""
    if not 1 <= mib <= 4096:
        raise InvalidArgument(f"mib={mib}: preflight moves 1 to 4096 MiB")
    transport = transport or envs.get("KVXFER_TRANSPORT")
    interface = interface if interface is not None else envs.get("KVXFER_IFACE")
    rails = int(rails if rails is not None else envs.get("KVXFER_RAILS"))
    fabric = _fabric_of(transport)
    out = []
    for iface, limit_gbps, limit in _interfaces(fabric, interface):
        if progress:
            progress(f"preflight: {fabric}{' on ' + iface if iface else ''}, {mib} MiB ...")
        out.append(check(fabric, iface, rails, mib, limit_gbps, limit))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvxfer preflight", description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", help="auto (default: KVXFER_TRANSPORT): the fabric it opens; or tcp, fi_shm, efa, "
                                        "verbs, ucx")
    ap.add_argument("--interface", help="one NIC or interface (default: every RDMA NIC for efa/verbs, else "
                                        "KVXFER_IFACE or the provider's first)")
    ap.add_argument("--rails", type=int, help="fabric endpoints per agent (default: KVXFER_RAILS, 1)")
    ap.add_argument("--mib", type=int, default=64, help="request size in MiB (default: 64)")
    ap.add_argument("--json", metavar="PATH", help="also write the checks as JSON")
    a = ap.parse_args(argv)
    try:
        checks = run(a.transport, a.interface, a.rails, a.mib, progress=lambda m: print(m, file=sys.stderr))
    except KvxferError as e:
        print(f"FAIL preflight could not run: {type(e).__name__}: {e}")
        return 1
    for c in checks:
        print(c.line())
    if a.json:
        with open(a.json, "w") as f:
            json.dump([asdict(c) for c in checks], f, indent=1)
    return 0 if all(c.ok for c in checks) else 1
