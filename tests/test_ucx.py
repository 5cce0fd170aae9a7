"""transport='ucx' (csrc/transports/ucx): what is particular to it. The byte-exact transfers, layer-wise arrival,
cancels, restarts and a killed sender run for ucx beside the libfabric transports (TRANSPORTS in conftest)."""
import os
import re
import time

import numpy as np
import pytest

import kvxfer
from kvxfer import _C, errors
from tests.conftest import UCX, connect, local_pair
from tests.reference import PRESETS

pytestmark = list(UCX.marks)


def test_the_peer_names_the_ucx_lanes_that_carry_its_bytes():
    """A slow fallback (UCX over tcp where rc was expected) must be visible: Peer.path_reason lists the UCX
    transports of the endpoint and what each carries."""
    layout = PRESETS["vllm_flash"]()
    _a, _b, peer_b, _, _, _ = local_pair(layout, "ucx", ("lanes-a", "lanes-b"))
    assert peer_b.path == "ucx"
    lanes = re.search(r"ucx lanes: (.*)$", peer_b.path_reason)
    assert lanes, peer_b.path_reason
    carried = dict(re.findall(r"(\w+/[\w.:-]+) \(([^)]*)\)", lanes.group(1)))
    assert any("am" in uses.split(", ") for uses in carried.values()), lanes.group(1)
    assert "tcp/lo" in carried  # interface='lo' is UCX_NET_DEVICES=lo (and UCX 1.13 keeps shm out, see the README)


def test_ucx_and_libfabric_agents_refuse_each_other_naming_both():
    ucx = kvxfer.Agent("u", transport="ucx", interface="lo")
    tcp = kvxfer.Agent("t", transport="tcp", interface="lo")
    with pytest.raises(errors.TransportUnavailable, match="runs transport tcp but this agent runs ucx"):
        ucx.add_peer(tcp.metadata())
    with pytest.raises(errors.TransportUnavailable, match="runs transport ucx but this agent runs tcp"):
        tcp.add_peer(ucx.metadata())


def test_bad_ucx_settings_are_refused_when_the_agent_is_created(monkeypatch):
    with pytest.raises(errors.InvalidArgument, match="rails=2 with transport 'ucx'.*UCX_MAX_RMA_RAILS"):
        kvxfer.Agent("r", transport="ucx", interface="lo", rails=2)
    monkeypatch.setenv("UCX_TLS", "no-such-transport")
    with pytest.raises(errors.TransportUnavailable, match="ucp_init failed.*UCX_TLS"):
        kvxfer.Agent("t", transport="ucx", interface="lo")


def test_malformed_ucx_keys_in_peer_metadata_are_refused():
    """The packed UCX keys travel in the metadata; a key length beyond the limit is refused when the peer is added,
    before any write could use it."""
    from tests.test_errors import _reseal

    layout = kvxfer.KVLayout.contiguous(4, 4096)
    a = kvxfer.Agent("keys-a", transport="ucx", interface="lo")
    a.register_pool(np.zeros(4 * 4096, np.uint8), layout)
    md = a.metadata()
    payload = md[16:]
    pool_key = (1 << 16).to_bytes(8, "little")  # the first pool's first region (agent.cpp)
    at = next(i for i in (m.start() for m in re.finditer(re.escape(pool_key), payload))
              if 0 < int.from_bytes(payload[i + 8:i + 12], "little") <= 16384)  # key id, then its packed length
    tampered = payload[:at + 8] + (1 << 30).to_bytes(4, "little") + payload[at + 12:]
    b = kvxfer.Agent("keys-b", transport="ucx", interface="lo")
    with pytest.raises(errors.MetadataError, match="UCX key .* claims 1073741824 bytes"):
        b.add_peer(_reseal(md, tampered))
    b.add_peer(_reseal(md, payload))  # resealed untampered: accepted


def test_a_receiver_on_another_host_that_dies_fails_the_send_through_ucx(remote):
    """The receiver runs under another host name, so its process cannot be watched from here and sends no BYE when
    killed: only UCX's endpoint error (error mode peer) can tell. The send fails with PeerLost naming the UCX
    failure long before its 60 s deadline."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the peer a host name of its own (unshare CLONE_NEWUTS)")
    assert remote.call("hostname", "kvxfer-ucx-elsewhere") == "kvxfer-ucx-elsewhere"
    agent, peer, layout, _, _ = connect("ucx", remote, "vllm_flash", 3, timeout_s=60)
    assert not peer.same_host
    remote.call("recv", (7, [1, 2]))
    send = agent.send(peer, 7, [0, 1], [1, 2])
    send.layer_ready(0)
    assert remote.call("recv_wait", (7, 0, 30)) == "PENDING"
    remote.conn.send(("crash", None))
    remote.proc.join(10)
    t0 = time.monotonic()
    with pytest.raises(errors.PeerLost, match="UCX endpoint failed"):
        for layer in range(1, layout.num_layers):
            send.layer_ready(layer)
            time.sleep(0.05)
        send.wait(timeout_s=30)
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("writes", ["am", "put"])
def test_writes_go_as_active_messages_without_an_rma_lane_and_both_ways_are_exact(monkeypatch, writes):
    """UCX over tcp has no RMA lane: its puts would be emulated, and UCX 1.13 aborts the receiving process when a
    sender dies mid-put (kvxfer.bench.soak). Such peers get kvxfer's own data messages by default, and the peer
    says so; KVXFER_UCX_WRITES=put keeps UCX's puts (the path a native RMA lane takes). Both are exact."""
    from tests.conftest import assert_exact_transfer

    if writes == "put":
        monkeypatch.setenv("KVXFER_UCX_WRITES", "put")
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "ucx", (f"w-{writes}-a", f"w-{writes}-b"))
    assert ("writes: kvxfer active messages" if writes == "am" else "writes: ucp puts") in peer_b.path_reason
    rng = np.random.default_rng(5)
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 1, rng.permutation(32)[:20].astype(np.int32),
                          rng.permutation(32)[:20].astype(np.int32))


def test_info_says_how_ucx_writes(monkeypatch):
    from kvxfer import info

    """Here UCX has tcp and shared memory only, none with an RMA lane: auto writes data AMs to every peer, and so
    gives each peer keys of its own; with puts (or KVXFER_PEER_KEYS=shared) all peers share one key."""
    line = info.collect()["transports"]["ucx"][1]
    assert "writes: kvxfer active messages everywhere (none of these resources has an RMA lane)" in line, line
    assert "each peer writes with keys of its own" in line, line
    monkeypatch.setenv("KVXFER_UCX_WRITES", "put")
    line = info.collect()["transports"]["ucx"][1]
    assert "writes: ucp puts everywhere (KVXFER_UCX_WRITES=put)" in line and "one key for all peers" in line, line
    monkeypatch.setenv("KVXFER_UCX_WRITES", "am")
    monkeypatch.setenv("KVXFER_PEER_KEYS", "shared")
    line = info.collect()["transports"]["ucx"][1]
    assert "active messages everywhere (KVXFER_UCX_WRITES=am)" in line and "one key for all peers" in line, line


def test_a_bad_ucx_writes_setting_is_refused(monkeypatch):
    monkeypatch.setenv("KVXFER_UCX_WRITES", "rdma")
    with pytest.raises(errors.InvalidArgument, match="KVXFER_UCX_WRITES='rdma': use auto"):
        kvxfer.Agent("bad-writes", transport="ucx", interface="lo")


@pytest.mark.parametrize("writes", ["am", "put"])
def test_many_layers_of_small_writes_share_flushes(monkeypatch, writes):
    """Puts: immediates wait for a flush of the puts before them; the flush is asked once per poll for every put
    since the last, so a request of many small writes completes exactly without one flush round trip per write.
    Data messages carry their immediate: one message per write, nothing to flush."""
    if writes == "put":
        monkeypatch.setenv("KVXFER_UCX_WRITES", "put")
    layout = kvxfer.KVLayout.vllm_flash(num_layers=16, num_blocks=256, block_size=1, num_kv_heads=1, head_dim=8,
                                         dtype="float32")
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "ucx", ("flush-a", "flush-b"))
    rng = np.random.default_rng(4)
    src_ids = rng.permutation(256).astype(np.int32)
    dst_ids = rng.permutation(256).astype(np.int32)
    from tests.conftest import assert_exact_transfer

    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 1, src_ids, dst_ids)
    assert a.stats()["writes_posted"] == b.stats()["imms_received"] > 256


def test_info_lists_ucx_with_the_resources_it_opened():
    from kvxfer import info

    usable, detail = info.collect()["transports"]["ucx"]
    assert usable, detail
    assert detail.startswith("ucx 1.") and "tcp/lo" in detail, detail


def test_importing_kvxfer_loads_no_ucx_and_a_ucx_agent_keeps_the_process_signal_handlers():
    """UCX lives in the plugin kvxfer/_ucx.so, loaded when an agent first asks for transport 'ucx': an engine that
    imports kvxfer gets none of UCX's libraries, and one that uses it keeps its own SIGSEGV/SIGBUS/SIGILL/SIGFPE
    handlers. Two libraries would replace them when they load: UCX's libucs (the loader sets UCX_ERROR_SIGNALS
    empty) and libfabric's psm provider, libinfinipath, loaded with _C (kvxfer sets IPATH_NO_BACKTRACE=1); either
    is left alone when the user set it."""
    import subprocess
    import sys

    code = """
import ctypes, signal
libc = ctypes.CDLL(None)
def handler(sig):
    buf = ctypes.create_string_buffer(256)
    assert libc.sigaction(sig, None, buf) == 0
    return bytes(buf.raw[:8])
before = {s: handler(s) for s in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE)}
import kvxfer
assert 'libucs' not in open('/proc/self/maps').read(), 'importing kvxfer loaded UCX'
kvxfer.Agent('sig', transport='ucx', interface='lo')
assert 'libucs' in open('/proc/self/maps').read(), 'a ucx agent without UCX?'
after = {s: handler(s) for s in before}
assert after == before, f'UCX replaced signal handlers: {before} -> {after}'
print('ok')
"""
    env = {k: v for k, v in os.environ.items() if k not in ("UCX_ERROR_SIGNALS", "IPATH_NO_BACKTRACE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_peer_key_its_metadata_does_not_publish_fails_the_send_without_writing():
    """A region naming a UCX key id the peer's metadata holds no packed key for (a corrupted or hostile peer) fails
    the send with AccessViolation naming the key, and no byte of the destination changes."""
    from tests.test_errors import _reseal

    layout = kvxfer.KVLayout.contiguous(4, 4096)
    dst = np.full(4 * 4096, 7, np.uint8)
    b = kvxfer.Agent("akv-b", transport="ucx", interface="lo")
    b.register_pool(dst, layout)
    md = b.metadata()
    payload = md[16:]
    region_key = (1 << 16).to_bytes(8, "little") + (-1).to_bytes(4, "little", signed=True)  # rkey, then device -1
    at = payload.index(region_key)
    forged = payload[:at] + (1 << 16 | 9).to_bytes(8, "little") + payload[at + 8:]
    a = kvxfer.Agent("akv-a", transport="ucx", interface="lo")
    a.register_pool(np.ones(4 * 4096, np.uint8), layout)
    peer_b = a.add_peer(_reseal(md, forged))
    b.add_peer(a.metadata())
    a.wait_connected(peer_b, 20)
    send = a.send(peer_b, 1, [0, 1], [2, 3])
    send.all_ready()
    # Where each peer writes with keys of its own, the key named is ours for the forged one.
    own = _C.decode_metadata(md)["peer_keys"]
    with pytest.raises(errors.AccessViolation, match="exposed no memory under key " +
                       (r"\d+ \(our own for one it published\)" if own else f"{1 << 16 | 9};")):
        send.wait(timeout_s=20)
    assert (dst == 7).all()


RECEIVER_IN_NETNS = """
import sys
import numpy as np
import kvxfer
from tests.reference import PRESETS, apply, make_pool
layout = PRESETS["vllm_flash"]()
dst = make_pool(layout, 2)
expected = [x.copy() for x in dst]
src_ids, dst_ids = np.array([5, 0, 31, 7], np.int32), np.array([1, 2, 3, 30], np.int32)
apply(layout, make_pool(layout, 1), expected, src_ids, dst_ids, range(layout.num_layers))
agent = kvxfer.Agent("netns-receiver", transport="ucx", interface=sys.argv[1])
agent.register_pool(dst, layout)
print(agent.metadata().hex(), flush=True)
peer = agent.add_peer(bytes.fromhex(sys.stdin.readline()))
agent.recv(peer, 77, dst_ids).wait(timeout_s=30)
print("exact" if all(np.array_equal(g, w) for g, w in zip(dst, expected)) else "corrupt", peer.path_reason, flush=True)
"""


def test_a_transfer_between_two_network_namespaces_over_ucx():
    """The receiver runs in a network namespace of its own, reached over a veth pair (not loopback): UCX carries a
    paged transfer across it byte for byte, on the interfaces the agents were given."""
    import subprocess
    import sys

    from tests.reference import PRESETS, make_pool

    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace and a veth pair")
    tag = os.getpid() % 100000
    ns, if_a, if_b = f"kvxu{tag}", f"kvu{tag}a", f"kvu{tag}b"
    net = f"10.{200 + tag % 50}.{tag % 250}"
    setup = [["ip", "netns", "add", ns], ["ip", "link", "add", if_a, "type", "veth", "peer", "name", if_b],
             ["ip", "link", "set", if_b, "netns", ns], ["ip", "addr", "add", f"{net}.1/24", "dev", if_a],
             ["ip", "link", "set", if_a, "up"], ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{net}.2/24", "dev", if_b],
             ["ip", "netns", "exec", ns, "ip", "link", "set", if_b, "up"]]
    try:
        for cmd in setup:
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                pytest.skip(f"cannot build the namespace here: {' '.join(cmd)}: {r.stderr.strip()}")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        recv = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", RECEIVER_IN_NETNS, if_b],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root,
                                env={**os.environ, "PYTHONPATH": root})
        try:
            layout = PRESETS["vllm_flash"]()
            agent = kvxfer.Agent("netns-sender", transport="ucx", interface=if_a)
            agent.register_pool(make_pool(layout, 1), layout)
            peer = agent.add_peer(bytes.fromhex(recv.stdout.readline()))
            recv.stdin.write(agent.metadata().hex() + "\n")
            recv.stdin.flush()
            agent.wait_connected(peer, 20)
            assert f"tcp/{if_a}" in peer.path_reason, peer.path_reason
            send = agent.send(peer, 77, [5, 0, 31, 7], [1, 2, 3, 30])
            send.all_ready()
            send.wait(timeout_s=30)
            verdict = recv.stdout.readline().split(" ", 1)
            assert verdict[0] == "exact" and f"tcp/{if_b}" in verdict[1], verdict
        finally:
            recv.kill()
            recv.wait()
    finally:
        subprocess.run(["ip", "link", "del", if_a], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


PAIRS_CREATED_AND_DROPPED = """
import sys
import kvxfer
from tests.reference import PRESETS, make_pool
layout = PRESETS["vllm_flash"]()
for i in range(int(sys.argv[1])):
    a = kvxfer.Agent(f"drop-{i}-a", transport="ucx", interface="lo")
    a.register_pool(make_pool(layout, 1), layout)
    b = kvxfer.Agent(f"drop-{i}-b", transport="ucx", interface="lo")
    b.register_pool(make_pool(layout, 2), layout)
    peer_b, peer_a = a.add_peer(b.metadata()), b.add_peer(a.metadata())
    if i % 2:
        a.wait_connected(peer_b, 10)
    del peer_a, peer_b
    a.close()  # right after connecting: b's worker may still owe a a wireup reply
    b.close()
print("ok")
"""


def test_ucx_agents_closed_one_after_the_other_do_not_abort_the_process():
    """UCX 1.13 aborts the process when a worker is destroyed while it still owes a wireup reply to a peer that is
    already gone (ucp_request.c: "got REP message"; it ended this repository's suite once, and this loop hit it in
    1 of 3 runs while agents destroyed their workers): a ucx agent closes its endpoints but leaves its worker to the
    process's exit. Pairs of agents closed right after connecting must leave the process alive."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", PAIRS_CREATED_AND_DROPPED, "40"], capture_output=True, text=True,
                             cwd=root, env={**os.environ, "PYTHONPATH": root}, timeout=300, check=False)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_ucx_agents_that_key_peers_differently_refuse_each_other_naming_the_fix(monkeypatch):
    """With puts (KVXFER_UCX_WRITES=put, or UCX with an RMA lane) all peers share one key; without, each peer has its
    own. Such two agents cannot write into each other, so add_peer refuses and says what makes them agree."""
    own = kvxfer.Agent("ucx-own-keys", transport="ucx", interface="lo")
    monkeypatch.setenv("KVXFER_UCX_WRITES", "put")
    shared = kvxfer.Agent("ucx-shared-keys", transport="ucx", interface="lo")
    assert _C.decode_metadata(own.metadata())["peer_keys"] is True
    assert _C.decode_metadata(shared.metadata())["peer_keys"] is False
    with pytest.raises(errors.TransportUnavailable, match=r"peer 'ucx-shared-keys' does not give each peer keys of its "
                                                          r"own but this agent does .*KVXFER_UCX_WRITES=am on both"):
        own.add_peer(shared.metadata())
    shared.close()
    own.close()
