"""add_peer is idempotent: adding the same metadata again, also from many threads at once, gives the one peer, and
transfers through it land exactly. (Engines re-add peers on reconnects from several threads: LightLLM#1470 saw two
threads re-adding one NIXL agent bring UCX down.)"""
import threading

import pytest

import kvxfer
from tests.conftest import TRANSPORTS, assert_exact_transfer
from tests.reference import PRESETS, make_pool


def add_from_threads(agent, metadata, n):
    """agent.add_peer(metadata) from n threads released together; returns the peers and the errors."""
    start, peers, errors = threading.Barrier(n), [], []

    def add():
        start.wait()
        try:
            peers.append(agent.add_peer(metadata))
        except Exception as e:  # the test reports every one
            errors.append(e)

    threads = [threading.Thread(target=add) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return peers, errors


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_same_peer_added_from_many_threads_at_once_is_one_peer(transport):
    layout = PRESETS["vllm_flash"]()
    a = kvxfer.Agent("add-many-a", transport=transport, interface="lo")
    b = kvxfer.Agent("add-many-b", transport=transport, interface="lo")
    src, dst = make_pool(layout, 41), make_pool(layout, 42)
    a.register_pool(src, layout)
    b.register_pool(dst, layout)
    a_md, b_md = a.metadata(), b.metadata()
    peers_b, errors_a = add_from_threads(a, b_md, 8)
    peers_a, errors_b = add_from_threads(b, a_md, 8)
    assert not errors_a and not errors_b, errors_a + errors_b
    # one peer each way: every call returned the same native peer (before: up to 8, and over UCX none connected)
    assert len({id(p._h) for p in peers_b}) == 1 and len({id(p._h) for p in peers_a}) == 1
    b.wait_connected(peers_a[0], 20)
    a.wait_connected(peers_b[0], 20)
    assert_exact_transfer(a, b, peers_b[0], peers_a[0], src, dst, layout, 1, [2, 5, 9], [7, 0, 3])
    assert_exact_transfer(a, b, peers_b[-1], peers_a[-1], src, dst, layout, 2, [1], [4])
    a.close()
    b.close()
