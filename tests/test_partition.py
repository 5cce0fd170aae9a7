"""A network partition between two hosts mid-transfer: the sender and the receiver each run in a network namespace
(and under a host name) of their own, joined by a veth pair, and the link goes down while 128 MiB are in flight.
Neither side can tell the other anything any more (no BYE, no ABORT total), so each must settle on its own: the
receiver's recv once the silent sender is released and its keys are closed, the sender's send once its writes
stuck in the dead link complete with errors (the peer released). Then the link comes back, the sender's kernel
retransmits what it still held, and not one byte of the receiver's pool changes.
"""
import hashlib
import os
import signal
import subprocess
import time

import pytest

import kvxfer
from kvxfer import _C
from tests.conftest import UCX, RemoteError, RemoteSender, wait_for
from tests.reference import block_view, expected_after, make_pool

BIG = [8, 256, 16, 8, 128, "float16"]  # 128 MiB per transfer of 128 blocks
HEARTBEAT_S = 1.0


def _ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


def _wait_running(rx_ns, rx_if, tx_ns, tx_if):
    """The kernel marks a veth running up to ~1 s after it is set up, and UCX leaves out devices not running yet."""
    for ns, dev in ((rx_ns, rx_if), (tx_ns, tx_if)):
        wait_for(lambda ns=ns, dev=dev: "state UP" in _ip("-n", ns, "link", "show", "dev", dev).stdout,
                 f"{dev} running", 10)


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: yields (rx_ns, rx_if, tx_ns, tx_if); removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces and a veth pair")
    tag = os.getpid() % 100000
    rx_ns, tx_ns, rx_if, tx_if = f"kvpr{tag}", f"kvpt{tag}", f"kvp{tag}r", f"kvp{tag}t"
    net = f"10.{150 + tag % 50}.{tag % 250}"
    setup = [("netns", "add", rx_ns), ("netns", "add", tx_ns),
             ("link", "add", rx_if, "netns", rx_ns, "type", "veth", "peer", "name", tx_if, "netns", tx_ns),
             ("-n", rx_ns, "addr", "add", f"{net}.1/24", "dev", rx_if), ("-n", rx_ns, "link", "set", rx_if, "up"),
             ("-n", tx_ns, "addr", "add", f"{net}.2/24", "dev", tx_if), ("-n", tx_ns, "link", "set", tx_if, "up"),
             ("-n", rx_ns, "link", "set", "lo", "up"), ("-n", tx_ns, "link", "set", "lo", "up")]
    try:
        for args in setup:
            r = _ip(*args)
            if r.returncode != 0:
                pytest.skip(f"cannot build the namespaces here: ip {' '.join(args)}: {r.stderr.strip()}")
        _wait_running(rx_ns, rx_if, tx_ns, tx_if)
        yield rx_ns, rx_if, tx_ns, tx_if
    finally:
        _ip("-n", rx_ns, "link", "del", rx_if)
        _ip("netns", "del", rx_ns)
        _ip("netns", "del", tx_ns)


def _agent_in(transport, ns, iface, host, seed, name, heartbeat_s=HEARTBEAT_S):
    r = RemoteSender()
    r.call("netns", (ns, iface))
    r.call("hostname", host)
    kwargs = {"name": name, "interface": iface, "peer_timeout_s": heartbeat_s, "timeout_s": 120}
    return r, r.call("init", (transport, "vllm_flash", seed, BIG, 1, kwargs))


@pytest.mark.parametrize("transport", ["tcp", UCX])
def test_a_partition_mid_transfer_settles_both_sides_and_nothing_lands_after_it_heals(transport, two_hosts):
    """Over ucx the receiver fences the silent sender where every write is a data AM (UCX without RMA lanes, as
    here); where its peers would share one key (puts), its recv fails but stays unsettled (README, "Not done yet")."""
    rx_ns, rx_if, tx_ns, tx_if = two_hosts
    rx, rx_md = _agent_in(transport, rx_ns, rx_if, "kvxfer-part-rx", 11, "part-rx")
    fences = _C.decode_metadata(rx_md)["peer_keys"]
    tx, tx_md = _agent_in(transport, tx_ns, tx_if, "kvxfer-part-tx", 12, "part-tx")
    try:
        rx.call("add_peer", tx_md)
        tx.call("add_peer", rx_md)
        rx.call("recv", (1, list(range(128, 256))))
        tx.call("send", (1, list(range(128)), list(range(128, 256)), None, None))
        tx.call("mark", (1, 0))
        assert rx.call("recv_wait", (1, 0, 30)) == "PENDING"  # the link works: layer 0 arrived
        for layer in range(1, 8):
            tx.call("mark", (1, layer))
        assert _ip("-n", tx_ns, "link", "set", tx_if, "down").returncode == 0  # the partition
        cut = time.monotonic()
        state, layers, _ = rx.call("recv_state", 1)
        assert layers < 8, "the transfer completed before the link went down: nothing was cut off"

        if fences:
            wait_for(lambda: rx.call("recv_state", 1)[2], "the receiver's writes_over after the partition", 20)
        else:
            wait_for(lambda: rx.call("recv_state", 1)[0] == "FAILED", "the receiver's recv failed", 20)
        wait_for(lambda: tx.call("writes_over", ("send", 1)), "the sender's writes_over after the partition", 20)
        settled_s = time.monotonic() - cut
        state, layers, over = rx.call("recv_state", 1)
        assert state == "FAILED" and layers < 8 and over == fences
        with pytest.raises(RemoteError, match="PeerLost"):
            tx.call("wait", (1, 1))
        rx_stats, _ = rx.call("stats", None)
        assert rx_stats["peers_fenced"] == int(fences) and rx_stats["peers_silent"] == 1
        settled = rx.call("pool_digest", None)

        assert _ip("-n", tx_ns, "link", "set", tx_if, "up").returncode == 0  # healed
        _wait_running(rx_ns, rx_if, tx_ns, tx_if)
        time.sleep(3)  # the sender's kernel retransmits what it still held; the receiver's socket is closed
        assert rx.call("pool_digest", None) == settled, "bytes landed in the receiver after it settled"
        assert settled_s < 15, f"settling took {settled_s:.1f} s"

        # What a router does once the link is back: both sides add each other again (the same agents and epochs),
        # and a new request moves exactly, into blocks the cut-off one never addressed. (Over ucx the sender used to
        # crash inside UCX here, 2 of 3 runs: it had closed the endpoint with our writes still stuck in it.)
        assert tx.proc.is_alive() and rx.proc.is_alive()
        rx.call("add_peer", tx_md)
        tx.call("add_peer", rx_md)
        rx.call("recv", (2, list(range(16))))
        tx.call("send", (2, list(range(200, 216)), list(range(16)), None, "all"))
        assert rx.call("recv_wait", (2, None, 30)) == "DONE"
        layout = kvxfer.KVLayout.vllm_flash(*BIG)
        want = hashlib.sha256()
        src = make_pool(layout, 12)
        for layer in range(layout.num_layers):
            want.update(block_view(layout, src, layer)[:, list(range(200, 216))].tobytes())
        assert rx.call("blocks_digest", list(range(16))) == want.hexdigest()
    finally:
        for r in (rx, tx):
            if r.proc.is_alive():
                os.kill(r.proc.pid, signal.SIGCONT)
            r.close()


@pytest.mark.parametrize("transport", ["tcp", UCX])
def test_a_link_that_drops_for_two_seconds_mid_transfer_delays_it_and_nothing_more(transport, two_hosts):
    """A blip shorter than the heartbeat's patience (peer_timeout_s 10 s here): TCP retransmits once the link is back,
    the transfer completes, and the receiver's pool is exactly what the reference says, every other byte as it was."""
    rx_ns, rx_if, tx_ns, tx_if = two_hosts
    rx, rx_md = _agent_in(transport, rx_ns, rx_if, "kvxfer-blip-rx", 21, "blip-rx", heartbeat_s=10.0)
    tx, tx_md = _agent_in(transport, tx_ns, tx_if, "kvxfer-blip-tx", 22, "blip-tx", heartbeat_s=10.0)
    src_ids, dst_ids = list(range(128)), list(range(128, 256))
    try:
        rx.call("add_peer", tx_md)
        tx.call("add_peer", rx_md)
        rx.call("recv", (1, dst_ids))
        tx.call("send", (1, src_ids, dst_ids, None, None))
        tx.call("mark", (1, 0))
        assert rx.call("recv_wait", (1, 0, 30)) == "PENDING"
        for layer in range(1, 8):
            tx.call("mark", (1, layer))
        assert _ip("-n", tx_ns, "link", "set", tx_if, "down").returncode == 0
        assert rx.call("recv_state", 1)[1] < 8, "the transfer completed before the link went down"
        time.sleep(2.0)
        assert _ip("-n", tx_ns, "link", "set", tx_if, "up").returncode == 0
        wait_for(lambda: rx.call("recv_state", 1)[0] == "DONE", "the recv done after the link came back", 60)
        tx.call("wait", (1, 30))
        layout = kvxfer.KVLayout.vllm_flash(*BIG)
        want = hashlib.sha256()
        for arr in expected_after(layout, make_pool(layout, 21), 22, src_ids, dst_ids, range(layout.num_layers)):
            want.update(arr.tobytes())
        assert rx.call("pool_digest", None) == want.hexdigest()
        rx_stats, _ = rx.call("stats", None)
        assert rx_stats["peers_silent"] == 0 and rx_stats["peers_released"] == 0
    finally:
        for r in (rx, tx):
            r.close()
