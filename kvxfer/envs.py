"""Every KVXFER_* environment variable, in one place. An explicit argument always wins over these."""
import os

ENV_VARS = {
    "KVXFER_TRANSPORT": ("str", "auto", "default Agent transport: auto|shm|cma|tcp|fi_shm|efa|verbs|ucx"),
    "KVXFER_PROVIDER": ("str", "", "libfabric provider override for transport=auto (efa|verbs|tcp|shm)"),
    "KVXFER_IFACE": ("str", "", "network interface for IP providers, e.g. 'lo' (empty: any)"),
    "KVXFER_TIMEOUT_S": ("float", "60", "default transfer deadline in seconds"),
    "KVXFER_RAILS": ("int", "1", "fabric endpoints per agent to spread writes over (multi-rail, 1-16)"),
    "KVXFER_IDLE_WAIT": ("str", "fd", "idle progress thread: fd = block on the CQ's wait fd where the provider has "
                                      "one (read by the C++ core); poll = spin, then 20/200 us sleeps"),
    "KVXFER_CMA_THREADS": ("str", "", "threads for same-host copies of >= 1 MiB (0 or 1: the progress thread); "
                                      "empty: half the CPUs, 1 to 4 (read by the C++ core)"),
    "KVXFER_PROGRESS_CPUS": ("str", "inherit", "CPUs the progress thread may run on: inherit = those of the thread "
                                              "that creates the Agent (an engine may have pinned it to its compute "
                                              "cores); all = any this process may use; or a list like 2,3 or 4-7 "
                                              "(read by the C++ core)"),
    "KVXFER_MAX_PEERS": ("int", "32", "peers an Agent can hold at once, a power of two from 1 to 1024; each gets "
                                      "4096 / max_peers transfers in flight towards it"),
    "KVXFER_PEER_TIMEOUT_S": ("float", "30", "a connected peer silent this long (no message, write or heartbeat) is "
                                             "lost; heartbeats every peer_timeout_s / 4; 0: off"),
    "KVXFER_FALLBACK": ("str", "refuse", "refuse = a peer on another host is refused (SlowFallback) when kvxfer "
                                         "would reach it over TCP although this host has an RDMA NIC; allow = "
                                         "accept TCP there and log why"),
    "KVXFER_SYSFS": ("str", "/sys", "where kvxfer reads NICs and PCIe topology (a container that mounts the host's "
                                    "sysfs elsewhere)"),
    "KVXFER_DOORBELL": ("str", "1", "1: same-host peers signal layer completions and control messages through "
                                    "shared-memory rings; 0: through the fabric, like peers on other hosts"),
    "KVXFER_LANDING": ("str", "auto", "how peers reach this agent's pools besides direct writes: auto = landing slots "
                                      "where the fabric cannot write a pool and for host pools of < 32 KiB chunks on "
                                      "tcp; needed = only the former; always = every pool"),
    "KVXFER_PEER_KEYS": ("str", "own", "libfabric tcp/shm, and ucx where every write is a data AM (no RMA lane): "
                                      "own = every peer writes with keys of its own, closed when "
                                      "the peer is released, so nothing it still posts can land and its ended recvs "
                                      "settle; shared = one key for all peers (as efa/verbs always do; read by the "
                                      "C++ core)"),
    "KVXFER_TCP_IMM": ("str", "split", "libfabric tcp: split = a write's data goes as a plain write and its immediate "
                                      "in a zero-byte write after it (libfabric 1.17 crashes closing a connection "
                                      "that holds a write with immediate half received, as releasing a peer cut off "
                                      "mid-write does); inline = one write with immediate, to measure the split's "
                                      "cost (read by the C++ core)"),
    "KVXFER_IMM": ("str", "coalesced", "libfabric providers that order writes (tcp, verbs): coalesced = data writes "
                                       "carry no immediate and a zero-byte write after each MiB of a rail's writes "
                                       "and after a layer's last counts them; each = an immediate on every write "
                                       "(read by the C++ core)"),
    "KVXFER_UCX_WRITES": ("str", "auto", "ucx writes: auto = kvxfer's own active messages to peers UCX has no RMA lane "
                          "to (its tcp: emulated puts abort UCX 1.13 when the writer dies), puts otherwise; am | put "
                          "force one"),
    "KVXFER_PTRACER": ("str", "off", "any = processes of this user may reach this one (prctl PR_SET_PTRACER_ANY): "
                                     "same-host peers launched apart (not parent and child) then use CMA, doorbell "
                                     "rings and VMM handles under Yama ptrace_scope 1 (Ubuntu's default), and may "
                                     "also read and write all of its memory; off = as the host allows (read by the "
                                     "C++ core)"),
    "KVXFER_GPU_COPY": ("str", "auto", "GPU batch copies: auto = one gather kernel where the device reaches both "
                                       "ends, else copy engines; kernel; copy_engine (read by the C++ core)"),
    "KVXFER_GPU_LAUNCH": ("str", "batched", "cuda_ipc from a GPU pool: batched = the layers ready together as one "
                                            "gather kernel that marks each landed; per_layer = a launch and an "
                                            "event per layer (read by the C++ core)"),
    "KVXFER_GPU_FENCE_KIB": ("int", "256", "batched gather kernel: what each block copies before it fences and "
                                           "counts the layers it finished (fewer fences for small chunks); 0 = "
                                           "after every layer (read by the C++ core)"),
}


def get(name: str):
    kind, default, _ = ENV_VARS[name]
    raw = os.environ.get(name, default)
    try:
        return {"float": float, "int": int}.get(kind, str)(raw)
    except ValueError:
        from kvxfer.errors import InvalidArgument

        raise InvalidArgument(f"{name}={raw!r} is not a valid {kind}; unset it or fix it") from None
