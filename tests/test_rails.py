"""Multi-rail (several fabric endpoints per agent): writes are spread over every rail, and the receiver's counters
stay exact whichever endpoint each write used."""
import numpy as np
import pytest

import kvxfer
from kvxfer import errors
from tests.conftest import connect
from tests.reference import apply, make_pool


@pytest.mark.parametrize("transport", ["tcp", "fi_shm"])
def test_writes_spread_over_rails_and_counters_stay_exact(transport, remote):
    agent, peer, layout, dst, _ = connect(transport, remote, "flashinfer", seed=31, rails=3)
    assert agent.rails == 3 and peer.rails == 3
    rng = np.random.default_rng(4)
    perm = rng.permutation(layout.num_blocks).astype(np.int32)
    src_pool, expected = make_pool(layout, 31), [a.copy() for a in dst]
    recvs, orders = {}, {}
    for r in range(8):  # 8 requests x 3 scattered blocks, layers marked in a random order per request
        dst_ids = perm[3 * r: 3 * r + 3]
        src_ids = rng.choice(layout.num_blocks, 3, replace=False).astype(np.int32)
        apply(layout, src_pool, expected, src_ids, dst_ids, range(layout.num_layers))
        recvs[r] = agent.recv(peer, 500 + r, dst_ids)
        remote.call("send", (500 + r, src_ids.tolist(), dst_ids.tolist(), None, "none"))
        orders[r] = rng.permutation(layout.num_layers)
    for step in range(layout.num_layers):
        for r in range(8):
            remote.call("mark", (500 + r, int(orders[r][step])))
    for r in range(8):
        recvs[r].wait(timeout_s=30)
        assert remote.call("wait", (500 + r, 30)) == "DONE"
        assert recvs[r].layers_done == layout.num_layers
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)

    sent, _ = remote.call("stats", None)
    got = agent.stats()
    assert [r["writes"] > 0 for r in sent["rails"]] == [True] * 3, sent["rails"]
    # tcp orders writes: data writes carry no immediate, and each rail's zero-byte writes count them (one per
    # layer and rail that carried some); shm puts an immediate on every write.
    signals = sent["imm_writes"] if transport == "tcp" else sent["writes_posted"]
    assert (sent["imm_writes"] > 0) == (transport == "tcp")
    assert sum(r["writes"] for r in sent["rails"]) == sent["writes_posted"] + sent["imm_writes"]
    assert [r["imms"] > 0 for r in got["rails"]] == [True] * 3, got["rails"]
    assert sum(r["imms"] for r in got["rails"]) == got["imms_received"] == signals
    assert got["unknown_imms"] == 0


def test_peers_with_different_rail_counts_use_the_common_rails(remote):
    agent, peer, layout, dst, _ = connect("tcp", remote, "vllm_flash", seed=5, rails=2, remote_rails=4)
    assert peer.rails == 2
    assert remote.call("stats", None)[1] == 2
    ids = np.arange(layout.num_blocks, dtype=np.int32)[::3]
    expected = [a.copy() for a in dst]
    apply(layout, make_pool(layout, 5), expected, ids, ids[::-1].copy(), range(layout.num_layers))
    recv = agent.recv(peer, 1, ids[::-1].copy())
    remote.call("send", (1, ids.tolist(), ids[::-1].tolist(), None, "all"))
    recv.wait(timeout_s=30)
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)
    sent, _ = remote.call("stats", None)
    assert [r["writes"] > 0 for r in sent["rails"]] == [True, True, False, False]


@pytest.mark.parametrize("rails", [0, 17])
def test_rail_count_out_of_range(rails):
    with pytest.raises(errors.InvalidArgument, match="1 to 16"):
        kvxfer.Agent("r", transport="tcp", interface="lo", rails=rails)


def test_rails_from_environment(monkeypatch):
    monkeypatch.setenv("KVXFER_RAILS", "2")
    assert kvxfer.Agent("r", transport="tcp", interface="lo").rails == 2
    monkeypatch.setenv("KVXFER_RAILS", "two")
    with pytest.raises(errors.InvalidArgument, match="KVXFER_RAILS='two' is not a valid int"):
        kvxfer.Agent("r", transport="tcp", interface="lo")
