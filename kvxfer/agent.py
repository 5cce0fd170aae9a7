"""Agent: one per process. Owns the transport, registered pools, peers and a C++ progress thread.

    decode = Agent("decode-0"); pool = decode.register_pool(kv_tensors, layout)    # exposes the pool
    peer = prefill.add_peer(decode.metadata())          # bytes travel over the engine's own channel
    send = prefill.send(peer, request_id, src_ids, dst_ids)   # WritePlan built in C++
    for layer in range(layout.num_layers): run_layer(layer); send.layer_ready(layer)
    decode.recv(prefill_peer, request_id, dst_ids).wait(timeout_s=5.0)

Both sides add each other (agent.add_peer(other.metadata())): writes start once both have. Transfer ids are the
engine's request keys, scoped per peer. Python never loops per block: ids go to C++ as int32 arrays.
"""
from __future__ import annotations

import operator
import os
import time

import numpy as np

from kvxfer import _C, envs, topology
from kvxfer import fallback as fallback_policy
from kvxfer.errors import InvalidArgument, TransportUnavailable
from kvxfer.layout import KVLayout
from kvxfer.memory import as_region
from kvxfer.transfer import Recv, Send, TransferState


class Peer:
    """A remote agent: name, epoch, the pools it exposes, and the path used to write to it ("cma", "tcp", ...)."""

    def __init__(self, handle):
        self._h = handle

    name = property(lambda self: self._h.name)
    epoch = property(lambda self: self._h.epoch)
    path = property(lambda self: self._h.path)
    path_reason = property(lambda self: self._h.path_reason)
    signals = property(lambda self: self._h.signals,
                       doc='how completions and control messages reach it: "doorbell" (shared memory) or "fabric"')
    signals_reason = property(lambda self: self._h.signals_reason)
    connected = property(lambda self: self._h.connected)
    lost = property(lambda self: self._h.lost)
    same_host = property(lambda self: self._h.same_host)
    rails = property(lambda self: self._h.rails)
    heartbeat_ms = property(lambda self: self._h.heartbeat_ms,
                            doc="how often the peer PINGs this agent (0: never, so its silence is not judged)")
    silent_s = property(lambda self: self._h.silent_s,
                        doc="seconds since anything (message, write, heartbeat) came from the peer, checked every "
                            "10 ms; 0 before it connected")
    send_window = property(lambda self: self._h.send_window,
                           doc="transfers this agent may have in flight towards the peer (the peer's "
                               "4096 / max_peers; 0 until its handshake arrived)")
    pools = property(lambda self: [name for name, _ in self._h.pools])
    heads = property(lambda self: {name: (lay.head_begin, lay.head_begin + lay.num_kv_heads,
                                          lay.total_kv_heads or lay.num_kv_heads) for name, lay in self._h.pools},
                     doc="per pool: (first, end, model total) of the KV heads it holds, from its metadata")

    def __repr__(self) -> str:
        return f"<Peer {self.name} path={self.path} connected={self.connected}>"


class Pool:
    """A registered paged pool: its layout, the memory behind it, and its index in the agent."""

    def __init__(self, index: int, name: str, layout: KVLayout, memory):
        self.index, self.name, self.layout, self._memory = index, name, layout, memory

    def __repr__(self) -> str:
        return f"<Pool {self.name} {self.layout.kind} layers={self.layout.num_layers} blocks={self.layout.num_blocks}>"


def _ids(ids, what: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise InvalidArgument(f"{what} must be a 1-D integer array of block ids, got {arr.dtype} with shape {arr.shape}")
    if arr.dtype != np.int32 and arr.size and (arr.max() > np.iinfo(np.int32).max or arr.min() < np.iinfo(np.int32).min):
        raise InvalidArgument(f"{what} holds ids beyond int32; block ids are indexes into the pool")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _tokens(num_tokens) -> int:
    if num_tokens is None:
        return 0
    if int(num_tokens) < 1 or int(num_tokens) >= 1 << 32:
        raise InvalidArgument(f"num_tokens={num_tokens!r} must be a positive token count")
    return int(num_tokens)


def _layers(layers) -> tuple[int, int]:
    if layers is None:
        return 0, -1
    layers = range(layers, layers + 1) if isinstance(layers, int) else layers
    if not isinstance(layers, range) or layers.step != 1 or len(layers) == 0:
        raise InvalidArgument(f"layers must be a non-empty range with step 1, got {layers!r}")
    return layers.start, len(layers)


def _gpu_pci(gpu) -> str:
    """PCI bus id of a CUDA ordinal, "cuda:N" device, torch device or tensor, or a PCI bus id itself."""
    if hasattr(gpu, "device") and not isinstance(gpu, str):  # a tensor
        gpu = gpu.device
    if hasattr(gpu, "index") and hasattr(gpu, "type"):  # a torch.device; "cuda" alone is the current one
        if gpu.type != "cuda":
            raise InvalidArgument(f"gpu={gpu!r} is not a CUDA device: pass a CUDA ordinal, 'cuda:N', a CUDA tensor "
                                  "or device, or a PCI bus id (or leave gpu out for a host-only agent)")
        if gpu.index is None:
            import torch

            gpu = torch.cuda.current_device() if torch.cuda.is_available() else 0
        else:
            gpu = gpu.index
    if isinstance(gpu, str) and gpu.startswith("cuda:"):
        gpu = int(gpu[5:])
    if isinstance(gpu, str):
        return gpu
    devices = dict(_C.gpu_devices()) if _C.have_cuda and _C.gpu_status()[0] else {}
    if int(gpu) not in devices:
        why = _C.gpu_status()[1] if _C.have_cuda else "this build has no CUDA"
        raise InvalidArgument(f"gpu={gpu!r}: no such CUDA device here ({why or f'{len(devices)} visible'}); pass "
                              "the GPU's PCI bus id, or interface= to name the NIC")
    return devices[int(gpu)]


def _nearest_domain(gpu, transport: str) -> tuple[str | None, str]:
    provider = transport
    if transport in ("auto", "shm", "cma"):  # the fabric auto opens: efa > verbs > tcp
        usable = {name for name, ok, *_ in _C.probe_providers() if ok} if _C.have_libfabric else set()
        provider = next((p for p in ("efa", "verbs", "tcp") if p in usable), "tcp")
    name, why = topology.domain_for_gpu(_gpu_pci(gpu), provider, envs.get("KVXFER_SYSFS"))
    return name, (f"nearest the GPU: {name} for {provider}; {why}" if name else why)


def _max_peers(value) -> int:
    source = "max_peers"
    if value is None:
        value, source = envs.get("KVXFER_MAX_PEERS"), "KVXFER_MAX_PEERS"
    n = int(value)
    if not 1 <= n <= 1024 or n & (n - 1):
        raise InvalidArgument(f"{source}={value}: use a power of two from 1 to 1024 (each peer gets 4096 / max_peers "
                              "transfers in flight; 32 gives 128, 256 gives 16)")
    return n


class Agent:
    def __init__(self, name: str | None = None, *, transport: str | None = None, interface: str | None = None,
                 timeout_s: float | None = None, rails: int | None = None, staging: str = "auto",
                 staging_slot_bytes: int = 4 << 20, staging_slots: int = 16, cma_threads: int | None = None,
                 doorbell: bool | None = None, gpu=None, landing: str | None = None, landing_slots: int = 4,
                 landing_slot_bytes: int = 256 << 10, max_peers: int | None = None,
                 peer_timeout_s: float | None = None, fallback: str | None = None):
        """transport: auto | shm | cma | cuda_ipc | tcp | fi_shm | efa | verbs | ucx (see `python -m kvxfer info`).
        ucx: UCX picks the wires (UCX_TLS, UCX_NET_DEVICES; `interface` sets the latter); Peer.path_reason names
        the UCX lanes in use.
        staging: "auto" stages only GPU sources the fabric cannot read (GPU -> pinned bounce slots -> network);
        "always" sends every transfer through the bounce slots (to test or measure the staged pipeline).
        cma_threads: threads that run same-host copies of 1 MiB and more in parallel (0 or 1: the progress thread
        copies); None reads KVXFER_CMA_THREADS, else half the CPUs, 1 to 4.
        doorbell: same-host peers (CMA, CUDA IPC) signal layer completions and control messages through shared-memory
        rings instead of the fabric; None reads KVXFER_DOORBELL (default on). Peer.signals says which is used.
        gpu: the GPU whose KV this agent moves (CUDA ordinal, PCI bus id, torch device or tensor): with no
        interface given, the agent opens the NIC nearest that GPU on the PCIe tree (kvxfer.topology);
        Agent.interface_reason says which and why.
        landing: how peers reach this agent's pools when the fabric cannot write them (a GPU pool on a host without
        GPU-direct RDMA, reached from another host): "auto" gives each sending peer landing_slots registered host
        slots of landing_slot_bytes; a sender writes a batch there and this agent copies it into the pool (host-to-
        device) before counting it. "auto" also offers them for host pools of chunks under 32 KiB on a tcp fabric
        (while the ring stays <= 64 MiB): a tcp sender whose chunks are that small packs them into batches, one
        write each, instead of one write per chunk (~3x the bytes/s at 4 KiB here); peers with large chunks, RDMA
        NICs and same-host peers still write directly. "needed": only where the fabric cannot write a pool.
        "always" reaches every pool that way (to test or measure the pipeline). None reads KVXFER_LANDING (auto).
        max_peers: peers this agent can hold at once, a power of two from 1 to 1024; None reads KVXFER_MAX_PEERS
        (default 32). Every peer gets 4096 / max_peers transfers in flight towards this agent (32 peers: 128 each;
        256 peers: 16 each), and a landing ring (when one is needed) holds max_peers x landing_slots slots (at most
        16 GiB in all: a larger product is refused here).
        peer_timeout_s: a connected peer that sends nothing at all (no message, write or heartbeat) for this long is
        lost (PeerLost naming the silence; it is told with a BYE): its host may be down or cut off, or its process
        stopped. Heartbeats go to every connected peer every peer_timeout_s / 4; a peer whose own interval is longer
        is given 4 of its intervals. 0 turns them off (peers then do not judge this agent's silence); None reads
        KVXFER_PEER_TIMEOUT_S (default 30).
        fallback: "refuse" (default; None reads KVXFER_FALLBACK): when the transport was left to kvxfer and it
        opened tcp although this host has an RDMA NIC (or ucx gives a peer no RDMA lane), add_peer() refuses a peer
        on another host with SlowFallback naming the NICs and why RDMA did not open (kvxfer.fallback); "allow"
        accepts TCP, logs why once per peer and keeps it in Agent.fallback_reason."""
        opts = _C.AgentOptions()
        opts.name = name or f"kvxfer-{os.getpid()}"
        transport = transport or envs.get("KVXFER_TRANSPORT")
        provider = envs.get("KVXFER_PROVIDER")
        if transport == "auto" and provider:
            transport = {"shm": "fi_shm"}.get(provider, provider)
        opts.transport = transport
        opts.interface = interface if interface is not None else envs.get("KVXFER_IFACE")
        self.interface_reason = "given" if opts.interface else "none given: the provider picks its first domain"
        derived = gpu is not None and not opts.interface
        if derived:
            nearest, self.interface_reason = _nearest_domain(gpu, transport)
            opts.interface = nearest or ""
        opts.default_timeout_s = float(timeout_s if timeout_s is not None else envs.get("KVXFER_TIMEOUT_S"))
        rails = int(rails if rails is not None else envs.get("KVXFER_RAILS"))
        if not 1 <= rails <= 16:
            raise InvalidArgument(f"rails={rails}: an agent spreads writes over 1 to 16 fabric endpoints")
        opts.rails = rails
        if staging not in ("auto", "always"):
            raise InvalidArgument(f"staging={staging!r}: choose 'auto' (stage GPU sources only when needed) or 'always'")
        if staging_slots < 2 or staging_slot_bytes < 4096:
            raise InvalidArgument(f"staging needs >= 2 slots of >= 4096 bytes, got {staging_slots} x {staging_slot_bytes}")
        opts.staging, opts.staging_slot_bytes, opts.staging_slots = staging, int(staging_slot_bytes), int(staging_slots)
        if cma_threads is not None:
            if not 0 <= int(cma_threads) <= 64:
                raise InvalidArgument(f"cma_threads={cma_threads}: use 0 or 1 (copy on the progress thread) or 2 to 64")
            opts.cma_threads = int(cma_threads)
        if doorbell is None:
            raw = envs.get("KVXFER_DOORBELL")
            if raw not in ("0", "1"):
                raise InvalidArgument(f"KVXFER_DOORBELL={raw!r}: use 1 (shared-memory signals) or 0 (fabric)")
            doorbell = raw == "1"
        opts.doorbell = bool(doorbell)
        source = "landing" if landing is not None else "KVXFER_LANDING"
        landing = landing if landing is not None else envs.get("KVXFER_LANDING")
        if landing not in ("auto", "needed", "always"):
            raise InvalidArgument(f"{source}={landing!r}: choose 'auto' (GPU pools the fabric cannot write, and host "
                                  "pools of small chunks on tcp), 'needed' (only the former) or 'always'")
        if not 1 <= int(landing_slots) <= 256 or not 5120 <= int(landing_slot_bytes) <= 1 << 30:
            raise InvalidArgument(f"landing needs 1 to 256 slots per peer of 5120 bytes to 1 GiB, got {landing_slots} x "
                                  f"{landing_slot_bytes}")
        opts.landing, opts.landing_slots, opts.landing_slot_bytes = landing, int(landing_slots), int(landing_slot_bytes)
        opts.max_peers = _max_peers(max_peers)
        timeout = float(peer_timeout_s if peer_timeout_s is not None else envs.get("KVXFER_PEER_TIMEOUT_S"))
        if timeout != 0 and not 0.2 <= timeout <= 3600:
            source = "peer_timeout_s" if peer_timeout_s is not None else "KVXFER_PEER_TIMEOUT_S"
            raise InvalidArgument(f"{source}={timeout}: use 0 (no heartbeat) or 0.2 to 3600 seconds")
        opts.peer_timeout_s = timeout
        self._fallback_mode = fallback_policy.mode(fallback, envs.get("KVXFER_FALLBACK"))
        self._rdma_nics = topology.rdma_nics(envs.get("KVXFER_SYSFS"))
        self._c = self._open(opts, derived_interface=derived and bool(opts.interface))
        self.fallback_reason = fallback_policy.fabric_reason(transport, self._c.provider, self._rdma_nics)
        self._pools: dict[str, Pool] = {}
        self._peers: dict[int, Peer] = {}

    def _open(self, opts, derived_interface: bool):
        """The C++ agent. An interface chosen for the GPU (not given) that the provider does not offer (a netdev
        with no address, say) is dropped rather than refused: the provider then picks its first, and
        interface_reason says so."""
        try:
            return _C.Agent(opts)
        except TransportUnavailable as e:
            if not derived_interface or "has no domain named" not in str(e):
                raise
            nearest, opts.interface = opts.interface, ""
            self.interface_reason = (f"{nearest} is nearest the GPU but the provider does not offer it ({e}); the "
                                     "provider picks its first domain (Agent.domain)")
            return _C.Agent(opts)

    name = property(lambda self: self._c.name)
    epoch = property(lambda self: self._c.epoch)
    transport = property(lambda self: self._c.transport)
    provider = property(lambda self: self._c.provider)
    domain = property(lambda self: self._c.domain,
                      doc='the NIC or interface the fabric opened (libfabric domain: "eth0", "mlx5_0", '
                          '"rdmap16s27-rdm"; "" for ucx, whose lanes Peer.path_reason names)')
    rails = property(lambda self: self._c.rails)
    max_peers = property(lambda self: self._c.max_peers, doc="peers this agent can hold at once")
    transfers_per_peer = property(lambda self: self._c.transfers_per_peer,
                                  doc="transfers each peer may have in flight towards this agent (4096 / max_peers)")
    cma_threads = property(lambda self: self._c.cma_threads,
                           doc="threads that run large same-host copies (0: the progress thread copies)")
    doorbell = property(lambda self: self._c.doorbell[0],
                        doc="same-host peers can signal this agent through shared memory (see doorbell_reason)")
    doorbell_reason = property(lambda self: self._c.doorbell[1] or "shared-memory rings exposed to same-host peers")
    gpu_direct = property(lambda self: self._c.hmem, doc="the fabric registers GPU memory (FI_HMEM): no staging")

    def path_to(self, peer: Peer, *, pool=None, dst_pool: str = "") -> tuple[str, str]:
        """(path, reason) that send() from `pool` to the peer's `dst_pool` would take: "cma", "fabric", "cuda_ipc"
        or "staged", and why, with its expected cost, for a large transfer (over tcp, a transfer of small chunks
        whose layer moves under 32 KiB is written directly even where this says "staged": it is not packed).
        Raises TransportUnavailable when nothing reaches that pool."""
        names = peer.pools
        if dst_pool and dst_pool not in names:
            raise InvalidArgument(f"peer {peer.name} exposes no pool {dst_pool!r} (it exposes {names})")
        path, reason = self._c.choose_path(peer._h, self._pool(pool).index, names.index(dst_pool) if dst_pool else 0)
        if path == "cuda_ipc":
            reason += _gpu_link_note(self._pool(pool), peer._h.pool_gpu_pci_ids(names.index(dst_pool) if dst_pool else 0))
        return path, reason

    def check_peer(self, peer: Peer, *, pool=None, dst_pool: str = "") -> None:
        """At handshake time, what send() would say at the first request: raises LayoutMismatch naming the field
        (with both values) when this agent's `pool` cannot write the peer's `dst_pool` (other model shape, dtype,
        block size, or TP ranks with no KV head in common)."""
        layouts = dict(peer._h.pools)
        if not layouts:
            raise InvalidArgument(f"peer {peer.name} exposes no pool; it must register its pool before its metadata "
                                  "is taken")
        if dst_pool and dst_pool not in layouts:
            raise InvalidArgument(f"peer {peer.name} exposes no pool {dst_pool!r} (it exposes {list(layouts)})")
        mine = self._pool(pool).layout
        _C.check_compatible(mine.spec([0] * mine.num_layers, [0] * mine.num_layers),
                            layouts[dst_pool or next(iter(layouts))])

    def staging(self) -> dict:
        """The bounce ring of the staged path: slot_bytes, slots, pinned (zeros before the first staged send)."""
        slot_bytes, slots, pinned = self._c.staging_info()
        return {"slot_bytes": slot_bytes, "slots": slots, "pinned": bool(pinned)}

    def landing(self) -> dict | None:
        """The landing ring peers write into when the fabric cannot reach a pool directly: slot_bytes, slots per
        peer, pinned; None while no registered pool needs one."""
        slot_bytes, slots, pinned = self._c.landing_info()
        return {"slot_bytes": slot_bytes, "slots_per_peer": slots, "pinned": bool(pinned)} if slots else None

    last_landing_error = property(lambda self: self._c.last_landing_error,
                                  doc="why the last landing batch a peer wrote was refused ('' if none was)")

    def register_pool(self, memory, layout: KVLayout, name: str = "kv") -> Pool:
        """Register a paged pool once: a list of per-layer tensors/arrays, one stacked tensor, or one blocks-first
        tensor. Raises (RegistrationFailed, PoolTooSmall, ...) here, never at the first transfer."""
        items = list(memory) if isinstance(memory, (list, tuple)) and not _is_raw_range(memory) else [memory]
        regions = [as_region(m) for m in items]
        if layout.per_layer and len(regions) == layout.num_layers:
            layer_regions, offsets = list(range(len(regions))), [0] * layout.num_layers
        elif len(regions) == 1:
            layer_regions = [0] * layout.num_layers
            offsets = [i * layout.layer_stride for i in range(layout.num_layers)]  # stacked or blocks-first
        else:
            raise InvalidArgument(f"a {layout.kind} layout with {layout.num_layers} layers takes one tensor per layer "
                                  f"or one tensor for all layers, got {len(regions)}")
        spec = layout.spec(layer_regions, offsets)
        index = self._c.register_pool(name, spec, [_C.LocalRegion(r.addr, r.nbytes, r.device) for r in regions])
        pool = Pool(index, name, layout, items)
        pool._regions = regions
        self._pools[name] = pool
        return pool

    def metadata(self) -> bytes:
        """Versioned, length-checked bytes for the peer's add_peer(). Take them after registering pools."""
        return self._c.metadata()

    def add_peer(self, metadata: bytes) -> Peer:
        if not isinstance(metadata, (bytes, bytearray, memoryview)):
            raise InvalidArgument(f"add_peer takes the bytes from agent.metadata(), got {type(metadata).__name__}")
        peer = Peer(self._c.add_peer(bytes(metadata)))
        self._check_fallback(peer)
        self._peers[peer.epoch] = peer
        return peer

    def _check_fallback(self, peer: Peer) -> None:
        """Refuse (or, when allowed, log) a peer on another host that the NIC would not carry (kvxfer.fallback)."""
        if peer.same_host:
            return
        reason = (fallback_policy.ucx_reason(peer.path_reason, self._rdma_nics) if self.transport == "ucx"
                  else self.fallback_reason)
        if not reason:
            return
        if self._fallback_mode == "allow":
            self.fallback_reason = reason
            fallback_policy.allowed(self.name, peer.name, reason)
            return
        self._c.refuse_peer(peer._h, reason)  # its BYE tells the peer, once its HELLO arrives, that it was refused
        raise fallback_policy.refusal(peer.name, reason, self.transport)

    def remove_peer(self, peer: Peer, drain_s: float = 0.0) -> None:
        """End everything with `peer`: its sends and recvs fail with PeerUnknown naming the removal, new ones are
        refused, and the peer is told (an ABORT with the number of writes each of our sends posted, then a BYE), so
        a live peer fails its transfers with this agent (PeerLost), posts nothing more, and answers with the totals
        of its own sends: the ended recvs' writes_over turns True once those writes were counted here. A peer that
        cannot answer (stopped, cut off) leaves it False while its process may live (same host: True once it
        exited). No-op on a peer already lost or removed.

        With drain_s > 0 the transfers are ended through the peer first (Recv.cancel for the recvs, Send.abort for
        the sends; they fail with Cancelled / TransferFailed naming the removal) and this call waits, at most
        drain_s, until the peer has answered: their writes_over is then True even for a live peer on another host,
        so the engine can reuse those blocks instead of retiring them."""
        self._c.remove_peer(peer._h, float(drain_s))

    def wait_connected(self, peer: Peer, timeout_s: float = 10.0) -> None:
        self._c.wait_connected(peer._h, timeout_s)

    def _pool(self, pool) -> Pool:
        if pool is None:
            if not self._pools:
                raise InvalidArgument("no pool registered; call agent.register_pool(tensors, layout) first")
            return next(iter(self._pools.values()))
        if isinstance(pool, Pool):
            return pool
        if pool not in self._pools:
            raise InvalidArgument(f"no pool named {pool!r}; registered: {list(self._pools)}")
        return self._pools[pool]

    def send(self, peer: Peer, xfer_id: int, src_ids, dst_ids, *, pool=None, dst_pool: str = "", layers=None,
             timeout_s: float | None = None, num_tokens: int | None = None) -> Send:
        """Open a send of src blocks into the peer's dst blocks. Nothing is posted until layer_ready/all_ready.
        With peer.send_window transfers already in flight to the peer, the send waits for a slot (waiting_for_slot;
        its timeout runs meanwhile) and starts, in call order, when one comes back.
        num_tokens: the request's tokens, in order through src_ids and through dst_ids (needed when the pools'
        block sizes differ, and then on recv too; without it every token of the blocks moves, block i into i)."""
        first, count = _layers(layers)
        h = self._c.send(peer._h, _xfer(xfer_id), self._pool(pool).index, dst_pool, _ids(src_ids, "src_ids"),
                         _ids(dst_ids, "dst_ids"), first, count, timeout_s or 0.0, _tokens(num_tokens))
        return Send(self, peer, h)

    def recv(self, peer: Peer, xfer_id: int, dst_ids, *, pool=None, src_pool: str = "", layers=None,
             timeout_s: float | None = None, num_tokens: int | None = None) -> Recv:
        """Expect transfer xfer_id from peer into dst_ids of a local pool; may be called before or after the data.
        src_pool names the peer's pool the blocks come from (default: its first); it matters only between pools of
        different TP ranks or block sizes, where the count to expect depends on both layouts. num_tokens: as the
        sender's send() got it."""
        first, count = _layers(layers)
        h = self._c.recv(peer._h, _xfer(xfer_id), self._pool(pool).index, _ids(dst_ids, "dst_ids"), first, count,
                         timeout_s or 0.0, src_pool, _tokens(num_tokens))
        return Recv(self, peer, h)

    def wait_any(self, transfers, timeout_s: float) -> bool:
        """Sleeps until one of `transfers` (this agent's sends and recvs, or groups of them) is no longer pending,
        or timeout_s passed; True in the first case. For an engine that has nothing to do but wait on many
        transfers: it wakes when one ends instead of polling each (any transfer of this agent ending wakes it, and
        it looks again)."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = self._c.ended_count()
            if any(t.state != TransferState.PENDING for t in transfers):
                return True
            left = deadline - time.monotonic()
            if left <= 0 or not self._c.wait_ended(seen, left):
                return False

    def preflight(self, mib: int = 64) -> list:
        """kvxfer.preflight on this agent's own fabric and NIC: two agents of its own move a verified request of
        `mib` MiB over it, judged against a same-run limit (see `python -m kvxfer preflight`). Returns the Checks;
        raises TransportUnavailable naming each failed one, so an engine can call it at boot and stop there."""
        from kvxfer import preflight

        fabric = self.transport  # the fabric's own name: tcp, fi_shm, efa, verbs or ucx
        interface = "" if fabric in ("fi_shm", "ucx") else self.domain
        checks = [preflight.check(fabric, interface, self.rails, mib)]
        failed = [c.line() for c in checks if not c.ok]
        if failed:
            raise TransportUnavailable("preflight failed: " + "; ".join(failed))
        return checks

    def stats(self) -> dict:
        return self._c.stats()

    def close(self) -> None:
        """Stop the progress thread; live transfers fail with PeerLost."""
        self._c = _Closed()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _gpu_link_note(pool: Pool, dst_gpu_pci_ids) -> str:
    """'; link: nvlink' (or pcie / same-gpu) between our pool's GPU and the peer's, from NVML when it is there."""
    from kvxfer import topology

    gpus, _ = topology.gpus()  # never raises: NVML errors leave GPUs out
    device = pool._regions[0].device
    pci = {d: p.lower() for d, p in _C.gpu_devices()}.get(device, "")  # CUDA ordinals != NVML indexes in general
    ours = next((g for g in gpus if g.pci == topology._norm_pci(pci)), None) if pci else None
    theirs_pci = {topology._norm_pci(p) for p in dst_gpu_pci_ids}
    theirs = next((g for g in gpus if g.pci in theirs_pci), None)
    return f"; link: {topology.link(ours, theirs)}" if ours and theirs else ""


class _Closed:
    def __getattr__(self, name):
        raise InvalidArgument("this Agent is closed")


def _xfer(xfer_id) -> int:
    x = int(xfer_id)
    if not 0 <= x < 2**64:
        raise InvalidArgument(f"transfer id {xfer_id} must be in [0, 2**64)")
    return x


def _is_raw_range(obj) -> bool:
    """A (ptr, nbytes, device) tuple of integers: Python ints or numpy ones (np.int64 is not an int subclass)."""
    if not (isinstance(obj, tuple) and len(obj) == 3):
        return False
    try:
        for v in obj:
            operator.index(v)
    except TypeError:
        return False
    return True
