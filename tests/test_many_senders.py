"""Several senders into one receiver: every immediate is counted for the peer that sent it.

rxm-based providers (tcp, verbs) report no source address for remote-write completions, so a receiver that told
its peers apart by source credited every immediate to its first peer: the second sender's transfers never
completed and its granules landed in the first one's counters. Each receiver now hands every peer its own window
of slots (in its HELLO), and the slot names the sender. Two sender processes, the same transfer ids on both,
concurrent sends in several rounds (slots reused), bytes checked against the reference including untouched blocks.
"""
import numpy as np
import pytest

import kvxfer
from tests.conftest import TRANSPORTS, RemoteSender
from tests.reference import PRESETS, apply, make_pool


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_two_senders_are_counted_apart(transport):
    layout = PRESETS["vllm_flash"]()  # 4 layers x 32 blocks
    agent = kvxfer.Agent("test-receiver", transport=transport, interface="lo", timeout_s=30)
    dst = make_pool(layout, 2000)
    agent.register_pool(dst, layout)
    expected = [a.copy() for a in dst]
    remotes = [RemoteSender() for _ in range(2)]
    try:
        peers = []
        for i, r in enumerate(remotes):
            md = r.call("init", (transport, "vllm_flash", 40 + i, [], 1, {"name": f"sender-{i}"}))
            peers.append(agent.add_peer(md))
            r.call("add_peer", agent.metadata())
            agent.wait_connected(peers[-1], 20)
        rng = np.random.default_rng(5)
        free_dst = list(rng.permutation(layout.num_blocks))
        for round_ in range(3):
            recvs = []
            for i, r in enumerate(remotes):
                src_ids = rng.choice(layout.num_blocks, 4, replace=False).astype(np.int32)
                dst_ids = np.array([free_dst.pop() for _ in range(4)], np.int32)
                apply(layout, make_pool(layout, 40 + i), expected, src_ids, dst_ids, range(layout.num_layers))
                recvs.append(agent.recv(peers[i], round_, dst_ids))  # the same transfer id from both peers
                r.call("send", (round_, src_ids.tolist(), dst_ids.tolist(), None, "all"))
            for i, r in enumerate(remotes):
                recvs[i].wait(timeout_s=30)
                assert recvs[i].layers_done == layout.num_layers
                assert r.call("wait", (round_, 30)) == "DONE"
        stats = agent.stats()
        assert stats["unknown_imms"] == 0
        for got, want in zip(dst, expected):
            np.testing.assert_array_equal(got, want)
    finally:
        for r in remotes:
            r.close()
