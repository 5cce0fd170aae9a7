"""Writes with immediate data on libfabric tcp go in two (csrc/transports/fabric/split_writes.h): the data as a
plain write, then the immediate in a zero-byte write after it on the same connection, because libfabric 1.17
crashes closing a connection that holds a write with immediate half received (tests/test_partition.py is the case
that crashed: a receiver releasing a sender cut off mid-write). Both modes must move a request byte for byte with
exact counters; KVXFER_TCP_IMM=inline is kept to measure what the split costs (benchmarks/RESULTS.md). Both apply
only with an immediate on every write (KVXFER_IMM=each): by default tcp's data writes carry none and one zero-byte
write per layer and rail counts them (tests/test_coalesced_imms.py).
"""
import numpy as np
import pytest

import kvxfer
from kvxfer import errors
from tests.conftest import assert_exact_transfer, info_line, local_pair

BIG = kvxfer.KVLayout.vllm_flash(8, 256, 16, 8, 128, "float16")  # 64 KiB chunks: 128 MiB per 128 blocks


@pytest.mark.parametrize("mode", ["split", "inline"])
def test_both_modes_move_scattered_and_gathered_blocks_exactly(mode, monkeypatch):
    """Runs of neighbouring blocks go as gathered writes (post_writev), lone ones one by one (post_write); 128 MiB
    in flight at once also fills the socket, so zero-byte halves the provider refuses wait and go later."""
    monkeypatch.setenv("KVXFER_TCP_IMM", mode)
    monkeypatch.setenv("KVXFER_IMM", "each")
    a, b, peer_b, peer_a, src, dst = local_pair(BIG, names=(f"split-{mode}-s", f"split-{mode}-r"))
    try:
        rng = np.random.default_rng(5)
        lone_src, lone_dst = rng.permutation(256)[:40], rng.permutation(256)[:40]
        assert_exact_transfer(a, b, peer_b, peer_a, src, dst, BIG, 1, lone_src, lone_dst)
        assert_exact_transfer(a, b, peer_b, peer_a, src, dst, BIG, 2, range(128), range(128, 256))
        sent, got = a.stats(), b.stats()
        assert got["imms_received"] == sent["writes_posted"] and got["unknown_imms"] == 0  # one immediate per write
    finally:
        a.close()
        b.close()


def test_a_bad_mode_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("KVXFER_TCP_IMM", "twice")
    with pytest.raises(errors.InvalidArgument, match="KVXFER_TCP_IMM='twice' is not one of split, inline"):
        kvxfer.Agent("split-bad", transport="tcp", interface="lo")


def test_info_says_how_tcp_sends_immediates():
    for mode, said in (("split", "immediates follow their data"), ("inline", "one write with immediate each")):
        tcp = info_line("tcp", KVXFER_TCP_IMM=mode, KVXFER_IMM="each")
        assert said in tcp and f"KVXFER_TCP_IMM={mode}" in tcp, tcp
