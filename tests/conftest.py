"""Agent pairs across two real processes: the test process receives, a spawned peer process sends."""
import contextlib
import multiprocessing as mp
import os
import signal
import time

import pytest

os.environ.setdefault("FI_TCP_IFACE", "lo")  # libfabric's tcp provider: loopback only
# Peers "on another host" here are other UTS namespaces over loopback, where tcp is the only wire: on a machine
# whose sysfs lists an RDMA NIC (a GPU host) kvxfer.fallback would refuse them. tests/test_fallback.py sets refuse.
os.environ.setdefault("KVXFER_FALLBACK", "allow")

def _have_ucx():
    try:
        from kvxfer import _C
    except ImportError:
        return False
    return _C.have_ucx


# ucx: scripts/setup.sh installs libucx-dev, so CI always builds it; a build without it skips these, saying so.
UCX = pytest.param("ucx", marks=pytest.mark.skipif(not _have_ucx(), reason="this kvxfer build has no UCX "
                                                   "(apt-get install libucx-dev, then pip install -e .)"))
TRANSPORTS = ["tcp", "fi_shm", "cma", UCX]


def open_fds() -> set:
    """What this process's fds point at (sockets, eventfds, pidfds, files), to check nothing stayed open."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.add(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:
            pass
    return fds


def info_line(transport, **env):
    """The line `python -m kvxfer info` prints for `transport` ("tcp", "ucx", ...), run with these variables set."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "kvxfer", "info"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=root, **env), check=True)
    return next(line for line in out.stdout.splitlines() if line.split()[1:2] == [transport])


def wait_for(pred, what, timeout_s=30.0):
    """Polls pred() every 10 ms; fails naming `what` when it is still false after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s}s")
        time.sleep(0.01)


def assert_ended_sender_was_told(remote, xfer, dst, before):
    """The receiver ended its peer `remote` (remove_peer, or the peer's restart) while `remote` was sending xfer:
    the sender was told (BYE), so its send fails at once naming it, marking more layers is refused, and no byte
    of dst changed since `before`."""
    import numpy as np

    with pytest.raises(RemoteError, match="PeerLost.*removed this agent"):
        remote.call("wait", (xfer, 10))
    with pytest.raises(RemoteError, match="already failed"):
        remote.call("mark", (xfer, 1))
    for got, want in zip(dst, before):
        np.testing.assert_array_equal(got, want)


def cancel_after_layer_0(agent, peer, remote, xfer, src_ids, dst_ids, reason="preempted"):
    """The sender in `remote` has layer 0 of transfer xfer landed here when this receiver cancels: its send fails
    with Cancelled naming the receiver's cancel (not at its deadline), marking more layers is refused, and the
    recv's writes_over turns True once the sender's ABORT total was counted. Returns the recv."""
    recv = agent.recv(peer, xfer, dst_ids)
    remote.call("send", (xfer, src_ids, dst_ids, None, None))
    remote.call("mark", (xfer, 0))
    recv.wait(layer=0, timeout_s=30)
    recv.cancel(reason)
    with pytest.raises(RemoteError, match=f"Cancelled: transfer {xfer} to peer '{agent.name}' was cancelled by the "
                                          "receiver"):
        remote.call("wait", (xfer, 10))
    with pytest.raises(RemoteError, match="already failed"):
        remote.call("mark", (xfer, 1))
    wait_for(lambda: recv.writes_over, "writes_over once the sender's posted writes were counted", timeout_s=10)
    return recv


class RemoteSender:
    def __init__(self, serve=None):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        if serve is None:
            from tests.peer import serve

        self.proc = ctx.Process(target=serve, args=(child,), daemon=True)
        self.proc.start()

    def call(self, cmd, *args, timeout_s=120):
        self.conn.send((cmd, args[0] if len(args) == 1 else args))
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"peer did not answer {cmd} within {timeout_s}s")
        reply = self.conn.recv()
        if reply[0] == "err":
            raise RemoteError(reply[1], reply[2])
        return reply[1]

    def close(self):
        if self.proc.is_alive():
            try:
                self.call("exit", None, timeout_s=10)
            except Exception:
                pass
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()


class RemoteError(Exception):
    def __init__(self, kind, message):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@pytest.fixture
def remote():
    r = RemoteSender()
    yield r
    r.close()


def local_pair(layout, transport="tcp", names=("sender", "receiver"), seeds=(11, 12), timeout_s=60.0,
               sender_kwargs=None, receiver_kwargs=None, dst_layout=None):
    """Two connected agents in this process, each with a seeded pool of `layout` (the receiver's of dst_layout
    when given: another TP rank, another block size).
    Returns (sender, receiver, peer_of_receiver, peer_of_sender, src_pool, dst_pool)."""
    import kvxfer
    from tests.reference import make_pool

    dst_layout = dst_layout or layout
    a = kvxfer.Agent(names[0], transport=transport, interface="lo", timeout_s=timeout_s, **(sender_kwargs or {}))
    b = kvxfer.Agent(names[1], transport=transport, interface="lo", timeout_s=timeout_s, **(receiver_kwargs or {}))
    src, dst = make_pool(layout, seeds[0]), make_pool(dst_layout, seeds[1])
    a.register_pool(src, layout)
    b.register_pool(dst, dst_layout)
    peer_b = a.add_peer(b.metadata())
    peer_a = b.add_peer(a.metadata())
    b.wait_connected(peer_a, 20)
    a.wait_connected(peer_b, 20)
    return a, b, peer_b, peer_a, src, dst


def fan_in(receiver, n, transport, layout, name="fan-in", seed=1000, timeout_s=30.0, connect_timeout_s=20.0):
    """n sender agents in this process, each with a pool of `layout` seeded seed + i, connected both ways to
    `receiver`. Returns (senders, their pools, each sender's peer for the receiver, the receiver's peer for each)."""
    import kvxfer
    from tests.reference import make_pool

    senders, pools, to_receiver, at_receiver = [], [], [], []
    for i in range(n):
        s = kvxfer.Agent(f"{name}-s{i}", transport=transport, interface="lo", timeout_s=timeout_s)
        pools.append(make_pool(layout, seed + i))
        s.register_pool(pools[-1], layout)
        to_receiver.append(s.add_peer(receiver.metadata()))
        at_receiver.append(receiver.add_peer(s.metadata()))
        senders.append(s)
    for s, pr, ps in zip(senders, to_receiver, at_receiver):
        s.wait_connected(pr, connect_timeout_s)
        receiver.wait_connected(ps, connect_timeout_s)
    return senders, pools, to_receiver, at_receiver


def assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, xfer_id, src_ids, dst_ids):
    """Moves src_ids -> dst_ids over every layer of a local_pair and checks the destination pool against the numpy
    reference: addressed chunks equal the source, every other byte untouched. Returns the finished recv."""
    import numpy as np

    from tests.reference import apply

    src_ids, dst_ids = np.asarray(src_ids, np.int32), np.asarray(dst_ids, np.int32)
    expected = [x.copy() for x in dst]
    apply(layout, src, expected, src_ids, dst_ids, range(layout.num_layers))
    recv = b.recv(peer_a, xfer_id, dst_ids)
    send = a.send(peer_b, xfer_id, src_ids, dst_ids)
    send.all_ready()
    recv.wait(timeout_s=30)
    send.wait(timeout_s=30)
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)
    return recv


def assert_exact_from_remote(agent, peer, remote, layout, dst, seed, xfer_id, src_ids, dst_ids):
    """The remote sender (pool from `seed`) moves src_ids -> dst_ids over every layer into `agent`'s pool `dst`;
    checks the addressed chunks equal the source and every other byte is untouched."""
    import numpy as np

    from tests.reference import expected_after

    want = expected_after(layout, dst, seed, src_ids, dst_ids, range(layout.num_layers))
    recv = agent.recv(peer, xfer_id, dst_ids)
    remote.call("send", (xfer_id, list(src_ids), list(dst_ids), None, "all"))
    recv.wait(timeout_s=30)
    for got, w in zip(dst, want):
        np.testing.assert_array_equal(got, w)


def connect(transport, remote, layout_kind, seed, layout_args=(), timeout_s=30.0, rails=1, remote_rails=None,
            sender_kwargs=None, receiver_kwargs=None):
    """Receiver agent here with a seeded destination pool; sender agent in `remote`. Returns (agent, peer, pool)."""
    import kvxfer
    from tests.reference import PRESETS, make_pool

    layout = getattr(kvxfer.KVLayout, layout_kind)(*layout_args) if layout_args else PRESETS[layout_kind]()
    agent = kvxfer.Agent("test-receiver", transport=transport, interface="lo", timeout_s=timeout_s, rails=rails,
                         **(receiver_kwargs or {}))
    dst = make_pool(layout, seed + 1000)  # not zeros: untouched blocks must keep these exact bytes
    agent.register_pool(dst, layout)
    sender_md = remote.call("init", (transport, layout_kind, seed, list(layout_args),
                                     rails if remote_rails is None else remote_rails, sender_kwargs or {}))
    peer = agent.add_peer(sender_md)
    path = remote.call("add_peer", agent.metadata())
    agent.wait_connected(peer, 20)
    return agent, peer, layout, dst, path


SILENT_LAYOUT = (8, 256, 16, 8, 128, "float16")  # 8 layers x 2 planes x 128 blocks x 64 KiB: 128 MiB per transfer
SILENT_HEARTBEAT = {"peer_timeout_s": 1.0}


@contextlib.contextmanager
def sender_gone_silent(transport, remote, seed):
    """The remote sender, heartbeats of 1 s on both sides, stops (SIGSTOP) part way through transfer 1 (128 MiB,
    its blocks 0-127 into ours 128-255) and the heartbeat ends it here. Yields (agent, peer, layout, dst, recv,
    before, metadata): dst as it was before the transfer, the sender's metadata from before it stopped. The
    sender is continued on the way out."""
    from kvxfer import errors

    agent, peer, layout, dst, _ = connect(transport, remote, "vllm_flash", seed, layout_args=SILENT_LAYOUT,
                                          timeout_s=120, receiver_kwargs=SILENT_HEARTBEAT,
                                          sender_kwargs=SILENT_HEARTBEAT)
    metadata = remote.call("metadata", None)
    before = [x.copy() for x in dst]
    recv = agent.recv(peer, 1, list(range(128, 256)), timeout_s=120)
    remote.call("send_and_stop", (1, list(range(128)), list(range(128, 256))))
    try:
        with pytest.raises(errors.PeerLost, match="sent nothing for"):
            recv.wait(timeout_s=30)
        yield agent, peer, layout, dst, recv, before, metadata
    finally:
        os.kill(remote.proc.pid, signal.SIGCONT)


def another_host(remote, name):
    """Puts the remote peer in a UTS namespace of its own under `name`: to this agent it is on another host, whose
    process it cannot watch (skips without root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the peer a host name of its own (unshare CLONE_NEWUTS)")
    assert remote.call("hostname", name) == name


def three_recvs_from_another_host(transport, remote, host, seed):
    """A sender on another host and three of its transfers into this agent: `partial` (layer 0 landed), `opened`
    (sent, nothing marked) and `never_sent` (only the recv). Returns (agent, peer, dst, expected, recvs), expected
    being dst with exactly layer 0 of the first transfer applied."""
    from tests.reference import apply, make_pool

    another_host(remote, host)
    agent, peer, layout, dst, _ = connect(transport, remote, "vllm_flash", seed)
    assert not peer.same_host
    expected = [x.copy() for x in dst]
    apply(layout, make_pool(layout, seed), expected, [0, 1], [3, 4], [0])
    partial = agent.recv(peer, 1, [3, 4], timeout_s=60)
    remote.call("send", (1, [0, 1], [3, 4], None, None))
    remote.call("mark", (1, 0))
    partial.wait(layer=0, timeout_s=30)
    opened = agent.recv(peer, 2, [5, 6], timeout_s=60)
    remote.call("send", (2, [2, 3], [5, 6], None, None))
    never_sent = agent.recv(peer, 3, [7], timeout_s=60)
    return agent, peer, dst, expected, (partial, opened, never_sent)


def assert_remote_send_fails_at_once(remote, why: str, name: str = "test-receiver", within_s: float = 10.0):
    """A send of the remote's to this agent (`name`), which ended the remote, fails within within_s with PeerLost
    saying `why` (a regex), not at its deadline."""
    t0 = time.monotonic()
    # "is lost: <why>" when send() finds the peer lost, <why> alone when the BYE arrives while the send waits,
    # "transfer N already failed: <why>" when it arrives between send() and marking the layers
    with pytest.raises(RemoteError,
                       match=f"PeerLost: (transfer \\d+ already failed: )?peer '{name}' (is lost: peer '{name}' )?{why}"):
        remote.call("send", (1, [0], [1], None, "all"))
        remote.call("wait", (1, 30))
    assert time.monotonic() - t0 < within_s


def assert_nothing_lands_after_writes_over(recv, layout, dst, before, untouched: slice, why: str):
    """recv ended mid-transfer: once its writes_over turns True, no byte of dst changes any more (0.5 s watched),
    and the blocks `untouched` (not addressed by it) still hold `before`."""
    import numpy as np

    from tests.reference import block_view

    wait_for(lambda: recv.writes_over, why, 10)
    settled = [x.copy() for x in dst]
    time.sleep(0.5)
    for now, then in zip(dst, settled):
        np.testing.assert_array_equal(now, then)
    for layer in range(layout.num_layers):
        np.testing.assert_array_equal(block_view(layout, dst, layer)[:, untouched],
                                      block_view(layout, before, layer)[:, untouched])


def assert_layerwise_concurrent(agent, peer, layout, dst, remote, seed, first_id, requests=8):
    """`requests` transfers from the remote sender (its pool made from `seed`), 4 blocks each, their layers marked
    in random orders, interleaved: the first marked layer completes alone, every recv completes with exact counts,
    and the destination equals the numpy reference (untouched blocks included)."""
    import numpy as np

    from tests.reference import apply, make_pool

    rng = np.random.default_rng(seed)
    perm = rng.permutation(layout.num_blocks).astype(np.int32)
    expected = [a.copy() for a in dst]
    src_pool = make_pool(layout, seed)
    recvs, orders = {}, {}
    for r in range(requests):
        dst_ids = perm[4 * r: 4 * r + 4]
        src_ids = rng.choice(layout.num_blocks, 4, replace=False).astype(np.int32)
        apply(layout, src_pool, expected, src_ids, dst_ids, range(layout.num_layers))
        recvs[r] = agent.recv(peer, first_id + r, dst_ids)
        remote.call("send", (first_id + r, src_ids.tolist(), dst_ids.tolist(), None, "none"))
        orders[r] = rng.permutation(layout.num_layers)
    first = int(orders[0][0])
    remote.call("mark", (first_id, first))
    recvs[0].wait(layer=first, timeout_s=30)
    assert recvs[0].layers_done == 1 and recvs[0].layer_done(first)  # only the marked layer arrived
    for step in range(layout.num_layers):
        for r in range(requests):
            if (r, step) != (0, 0):
                remote.call("mark", (first_id + r, int(orders[r][step])))
    for r in range(requests):
        recvs[r].wait(timeout_s=30)
        assert remote.call("wait", (first_id + r, 30)) == "DONE"
        assert recvs[r].layers_done == layout.num_layers
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)
