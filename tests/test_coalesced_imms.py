"""On providers that order writes (libfabric tcp; verbs' RC), data writes carry no immediate: after each MiB of a
rail's writes and after a layer's last write on it, one zero-byte write with immediate counts them all
(csrc/core/agent_progress.cpp, post_unsignalled and signal_rail). The receiver sees it only once the data before it
landed, so the counter contract is unchanged, with an immediate per MiB and rail instead of one per write.
KVXFER_IMM=each puts one on every write again.
"""
import time

import numpy as np
import pytest

import kvxfer
from kvxfer import errors
from tests.conftest import assert_exact_transfer, info_line, local_pair, wait_for
from tests.reference import PRESETS

BIG = kvxfer.KVLayout.vllm_flash(4, 256, 16, 8, 128, "float16")  # 32 KiB chunks, 16 MiB a layer for 256 blocks
# 128 KiB chunks, 64 MiB a layer: more than a send may have in flight on two rails (2 x 16 MiB), so the layer is
# still being posted when an abort comes.
HUGE = kvxfer.KVLayout.vllm_flash(2, 256, 64, 8, 128, "float16")


def test_one_immediate_per_layer_counts_every_write_of_it():
    a, b, peer_b, peer_a, src, dst = local_pair(BIG, names=("coalesce-s", "coalesce-r"))
    try:
        rng = np.random.default_rng(8)
        src_ids, dst_ids = rng.permutation(256)[:12], rng.permutation(256)[:12]  # 768 KiB a layer
        recv = assert_exact_transfer(a, b, peer_b, peer_a, src, dst, BIG, 1, src_ids, dst_ids)
        assert recv.layers_done == BIG.num_layers
        sent, got = a.stats(), b.stats()
        assert sent["writes_posted"] >= 6 * BIG.num_layers  # scattered blocks: ~1 write per 4 chunks
        # one rail, under 4,096 chunks and under 1 MiB a layer: one immediate each
        assert sent["imm_writes"] == got["imms_received"] == BIG.num_layers
        assert sum(r["writes"] for r in sent["rails"]) == sent["writes_posted"] + sent["imm_writes"]
        assert got["unknown_imms"] == 0 and got["slot_violations"] == 0
    finally:
        a.close()
        b.close()


def test_a_rail_counts_its_writes_every_mib():
    """The receiver learns of data only through completions: a rail's writes get an immediate at least every MiB.
    128 scattered blocks, 4 chunks of 32 KiB a write: 8 MiB a layer, 8 immediates (after each 1 MiB of writes)."""
    a, b, peer_b, peer_a, src, dst = local_pair(BIG, names=("cap-s", "cap-r"))
    try:
        # every other block on both sides: no two chunks of a write are neighbours, so no write is merged larger
        assert_exact_transfer(a, b, peer_b, peer_a, src, dst, BIG, 1, range(0, 256, 2), range(1, 256, 2))
        assert a.stats()["writes_posted"] == 64 * BIG.num_layers
        assert a.stats()["imm_writes"] == b.stats()["imms_received"] == 8 * BIG.num_layers
    finally:
        a.close()
        b.close()


def test_each_mode_puts_an_immediate_on_every_write(monkeypatch):
    monkeypatch.setenv("KVXFER_IMM", "each")
    a, b, peer_b, peer_a, src, dst = local_pair(BIG, names=("each-s", "each-r"))
    try:
        assert_exact_transfer(a, b, peer_b, peer_a, src, dst, BIG, 1, range(0, 256, 2), range(1, 256, 2))
        sent, got = a.stats(), b.stats()
        assert sent["imm_writes"] == 0 and got["imms_received"] == sent["writes_posted"] > BIG.num_layers
    finally:
        a.close()
        b.close()


def test_a_layer_of_more_chunks_than_one_immediate_counts_gets_several():
    """An immediate counts at most 4,095 chunks: 4,200 chunks a layer need two."""
    layout = kvxfer.KVLayout.vllm_flash(3, 4096, 1, 1, 8, "float16")  # 16-byte chunks
    # Landing slots would pack such small chunks; here they go one write each, as on a fabric that does not pack.
    a, b, peer_b, peer_a, src, dst = local_pair(layout, names=("many-s", "many-r"),
                                                receiver_kwargs={"landing": "needed"})
    try:
        rng = np.random.default_rng(2)
        src_ids, dst_ids = rng.permutation(4096)[:2100], rng.permutation(4096)[:2100]
        assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 1, src_ids, dst_ids)
        sent, got = a.stats(), b.stats()
        assert sent["imm_writes"] == got["imms_received"] == 2 * layout.num_layers
    finally:
        a.close()
        b.close()


def test_sends_aborted_mid_layer_count_their_writes_before_the_blocks_are_reused():
    """A 64 MiB layer over two rails is still being posted when the send is aborted: the writes already posted get
    their immediates before the ABORT, so the receiver reaches the ABORT's total (the slot comes back), its recv's
    writes_over means no byte of the aborted send lands after it, and the next transfer is exact."""
    a, b, peer_b, peer_a, src, dst = local_pair(HUGE, names=("abort-s", "abort-r"), sender_kwargs={"rails": 2},
                                                receiver_kwargs={"rails": 2})
    try:
        for i in range(6):
            src_ids = np.roll(np.arange(256, dtype=np.int32), 37 * i + 1)  # bytes these blocks do not hold yet
            recv = b.recv(peer_a, i, range(256))
            send = a.send(peer_b, i, src_ids, range(256))
            send.layer_ready(0)
            time.sleep(0.002 * i)  # abort at different points of the layer
            send.abort("request cancelled")
            with pytest.raises(errors.KvxferError, match="request cancelled"):
                send.wait(timeout_s=30)
            with pytest.raises(errors.KvxferError, match="abandoned transfer"):
                recv.wait(timeout_s=30)
            deadline = time.monotonic() + 30
            while not recv.writes_over and time.monotonic() < deadline:
                pass  # no sleep: the blocks are read the moment they are declared safe
            assert recv.writes_over, f"aborted recv {i}'s writes never over"
            settled = [x.copy() for x in dst]
            time.sleep(0.05)
            for now, then in zip(dst, settled):  # nothing of the aborted send landed after writes_over
                np.testing.assert_array_equal(now, then)
        wait_for(lambda: a.stats()["slots_reclaimed"] == 6, "six slots handed back")
        assert b.stats()["slot_violations"] == 0 and b.stats()["unknown_imms"] == 0
        recv = assert_exact_transfer(a, b, peer_b, peer_a, src, dst, HUGE, 100, range(128), range(128, 256))
        assert recv.writes_over
    finally:
        a.close()
        b.close()


def test_layer_by_layer_each_layer_completes_on_its_own_immediate():
    """Layers marked one at a time complete one at a time: a layer's immediate is not held back for the next."""
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, _, _ = local_pair(layout, names=("lbl-s", "lbl-r"))
    try:
        recv = b.recv(peer_a, 7, [4, 5, 6])
        send = a.send(peer_b, 7, [1, 2, 3], [4, 5, 6])
        for layer in range(layout.num_layers):
            send.layer_ready(layer)
            recv.wait(layer, timeout_s=30)
            assert recv.layers_done == layer + 1
        send.wait(timeout_s=30)
        assert a.stats()["imm_writes"] == b.stats()["imms_received"] == layout.num_layers
    finally:
        a.close()
        b.close()


def test_providers_that_do_not_order_writes_keep_one_immediate_per_write():
    """libfabric shm reports no write ordering (tx msg_order FI_ORDER_SAS): every write carries its immediate."""
    a, b, peer_b, peer_a, src, dst = local_pair(BIG, "fi_shm", names=("shm-imm-s", "shm-imm-r"))
    try:
        assert_exact_transfer(a, b, peer_b, peer_a, src, dst, BIG, 1, range(0, 256, 3), range(0, 256, 3))
        sent, got = a.stats(), b.stats()
        assert sent["imm_writes"] == 0 and got["imms_received"] == sent["writes_posted"]
    finally:
        a.close()
        b.close()


def test_a_bad_mode_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("KVXFER_IMM", "some")
    with pytest.raises(errors.InvalidArgument, match="KVXFER_IMM='some' is not one of coalesced, each"):
        kvxfer.Agent("imm-bad", transport="tcp", interface="lo")


def test_info_says_how_immediates_travel():
    tcp = info_line("tcp")
    assert "a zero-byte write after each MiB of a rail's writes and after a layer's last counts them" in tcp, tcp
    assert "an immediate on every write (KVXFER_IMM=each)" in info_line("tcp", KVXFER_IMM="each")
    assert "an immediate on every write (the provider does not order writes)" in info_line("fi_shm")
