"""No silent slow paths: a peer on another host is refused when kvxfer would reach it over TCP although this host
has an RDMA NIC.

Users of other transports have found this the hard way: an EFA or InfiniBand NIC the RDMA provider cannot open (a
container without /dev/infiniband, a libfabric built without the provider, no rdma-core) and the transport quietly
runs over TCP at a few percent of the link, or UCX emulating RDMA over TCP on an EFA host. kvxfer opens the best
provider it can (efa > verbs > tcp) when the transport is not named; if that turned out to be tcp on a host with
RDMA hardware, adding a peer on another host raises SlowFallback naming the NICs and why each RDMA provider did not
open. Same-host peers are unaffected (they take cma or CUDA IPC, not the NIC). Naming the transport
(transport="tcp", KVXFER_PROVIDER=tcp) or Agent(fallback="allow") / KVXFER_FALLBACK=allow accepts TCP; the agent
then logs the reason once and keeps it in Agent.fallback_reason.
"""
from __future__ import annotations

import logging
import re

from kvxfer import _C
from kvxfer.errors import InvalidArgument, SlowFallback

log = logging.getLogger("kvxfer.fallback")

MODES = ("refuse", "allow")
# Transports that leave the fabric to kvxfer: it opens the best provider it finds.
_AUTO_FABRIC = ("auto", "shm", "cma", "cuda_ipc")
# UCX transport names that drive an RDMA NIC (rc_verbs, rc_mlx5, dc_mlx5, ud_verbs, ud_mlx5, srd).
_UCX_RDMA_LANE = re.compile(r"\b(rc|dc|ud|srd)(_\w+)?/")


def mode(value: str | None, env_value: str) -> str:
    source, chosen = ("fallback", value) if value is not None else ("KVXFER_FALLBACK", env_value)
    if chosen not in MODES:
        raise InvalidArgument(f"{source}={chosen!r}: choose 'refuse' (a peer on another host is refused when it would "
                              "be reached over tcp although this host has an RDMA NIC) or 'allow'")
    return chosen


def _rdma_failures() -> str:
    """Why efa and verbs did not open here, from libfabric."""
    if not _C.have_libfabric:
        return "this build has no libfabric"
    rows = {name: detail for name, usable, detail, *_ in _C.probe_providers() if not usable}
    return "; ".join(f"{n}: {rows[n]}" for n in ("efa", "verbs") if n in rows) or "efa and verbs opened in a probe"


def fabric_reason(transport: str, provider: str, nics: list) -> str:
    """Why this agent's fabric is a slow fallback on this host, or '' when it is not: the transport was left to
    kvxfer, it opened tcp, and the host has RDMA NICs."""
    if transport not in _AUTO_FABRIC or not provider.startswith("tcp") or not nics:
        return ""
    return (f"this host has RDMA NIC(s) {', '.join(map(str, nics))}, but transport={transport} opened tcp because no "
            f"RDMA provider opened ({_rdma_failures()})")


def ucx_reason(path_reason: str, nics: list) -> str:
    """Why a ucx peer is reached over a slow fallback: this host has RDMA NICs and UCX gave the peer no RDMA lane."""
    lanes = re.search(r"ucx lanes: [^;]*", path_reason)
    lanes = lanes.group(0) if lanes else path_reason
    if not nics or _UCX_RDMA_LANE.search(lanes):
        return ""
    return f"this host has RDMA NIC(s) {', '.join(map(str, nics))}, but UCX reaches the peer with no RDMA lane ({lanes})"


def refusal(peer_name: str, reason: str, transport: str) -> SlowFallback:
    fix = ("make the RDMA provider open (libfabric with the efa or verbs provider, rdma-core, and /dev/infiniband "
           "in the container; `python -m kvxfer info` lists each provider's reason)" if transport != "ucx" else
           "give UCX the NIC (UCX_TLS=rc,... or dc,...; a UCX built with verbs; /dev/infiniband in the container) or "
           "use kvxfer's own fabric (transport='auto')")
    return SlowFallback(f"peer {peer_name} is on another host and would be reached over TCP: {reason}. That is "
                        f"typically 10-100x slower than the NIC. Either {fix}, or accept TCP: name it "
                        "(transport='tcp' or KVXFER_PROVIDER=tcp) or pass Agent(fallback='allow') / "
                        "KVXFER_FALLBACK=allow")


def allowed(agent_name: str, peer_name: str, reason: str) -> None:
    log.warning("kvxfer agent %s reaches peer %s over TCP although %s (allowed by fallback='allow')",
                agent_name, peer_name, reason)
