"""kvxfer.tp.rank_pairs (which prefill rank sends which heads to which decode rank) and SendGroup (one prefill rank's
sends of a request to several decode ranks), end to end: prefill and decode ranks as separate agents with pools
from KVLayout.for_tp_rank, every decode pool checked byte for byte against the numpy reference. Prefill ranks'
pools are seeded differently, so bytes from a rank that should not have sent (a second replica, a second MLA
sender) show."""
import itertools
import time

import numpy as np
import pytest

import kvxfer
from kvxfer import errors
from kvxfer.tp import RankPair, rank_pairs
from tests.reference import apply, apply_heads, make_pool

# ---- the table ---------------------------------------------------------------------------------------------------

TP_SIZES = [c for c in itertools.product([1, 2, 4, 8], [1, 2, 4, 8, 16], [1, 2, 4, 8, 16])
            if max(c[1], c[2]) % c[0] == 0 or c[0] % max(c[1], c[2]) == 0]  # (heads, prefill TP, decode TP)


@pytest.mark.parametrize("heads,ptp,dtp", TP_SIZES)
def test_every_decode_head_comes_from_exactly_one_prefill_rank_holding_it(heads, ptp, dtp):
    pairs = rank_pairs(heads, ptp, dtp)
    for d in range(dtp):
        first, n = kvxfer.KVLayout.tp_heads(heads, dtp, d)
        got = sorted(h for p in pairs if p.decode_rank == d for h in range(*p.heads))
        assert got == list(range(first, first + n)), (d, pairs)
    for p in pairs:
        # the pair's heads are what the transport moves: the heads the two rank pools have in common
        pb, pn = kvxfer.KVLayout.tp_heads(heads, ptp, p.prefill_rank)
        db, dn = kvxfer.KVLayout.tp_heads(heads, dtp, p.decode_rank)
        assert p.heads == (max(pb, db), min(pb + pn, db + dn)), p


def test_replicated_heads_are_sent_once_and_spread_over_the_replicas():
    # 2 heads on 4 prefill ranks (ranks 0, 1 hold head 0; ranks 2, 3 head 1), 2 decode ranks of 1 head each
    assert rank_pairs(2, 4, 2) == [RankPair(0, 0, (0, 1)), RankPair(3, 1, (1, 2))]
    senders = {p.prefill_rank for p in rank_pairs(8, 16, 8)}
    assert len(senders) == 8  # 8 decode ranks of one head each, each fed by one of the head's 2 replicas


def test_mla_latents_are_sent_once_per_decode_rank():
    assert rank_pairs(0, 4, 2) == [RankPair(0, 0, (0, 0)), RankPair(1, 1, (0, 0))]
    assert [p.prefill_rank for p in rank_pairs(0, 2, 4)] == [0, 1, 0, 1]


def test_bad_tp_sizes_are_refused():
    with pytest.raises(errors.InvalidArgument, match="do not split evenly"):
        rank_pairs(8, 3, 1)
    with pytest.raises(errors.InvalidArgument, match="must be >= 1"):
        rank_pairs(8, 0, 1)


# ---- end to end --------------------------------------------------------------------------------------------------

def run_tp(model, ptp, dtp, transport="cma", tag=""):
    """Prefill ranks send one request to the decode ranks rank_pairs names (a SendGroup each); decode ranks receive
    one recv per pair. Returns (decode pools, expected pools)."""
    mla = model.num_kv_heads == 0
    p_layout = [model if mla else model.for_tp_rank(ptp, p) for p in range(ptp)]
    d_layout = [model if mla else model.for_tp_rank(dtp, d) for d in range(dtp)]
    pre = [kvxfer.Agent(f"p{p}-{tag}", transport=transport, interface="lo", timeout_s=30) for p in range(ptp)]
    dec = [kvxfer.Agent(f"d{d}-{tag}", transport=transport, interface="lo", timeout_s=30) for d in range(dtp)]
    src = [make_pool(lay, 100 + p) for p, lay in enumerate(p_layout)]
    dst = [make_pool(lay, 200 + d) for d, lay in enumerate(d_layout)]
    for a, pool, lay in zip(pre + dec, src + dst, p_layout + d_layout):
        a.register_pool(pool, lay)
    pairs = rank_pairs(0 if mla else model.num_kv_heads, ptp, dtp)
    peers = {}
    for pr in pairs:
        if (pr.prefill_rank, pr.decode_rank) not in peers:
            a, b = pre[pr.prefill_rank], dec[pr.decode_rank]
            pb, pa = a.add_peer(b.metadata()), b.add_peer(a.metadata())
            a.wait_connected(pb, 20)
            b.wait_connected(pa, 20)
            peers[pr.prefill_rank, pr.decode_rank] = (pb, pa)
    rng = np.random.default_rng(ptp * 10 + dtp)
    src_ids = [rng.permutation(model.num_blocks)[:7].astype(np.int32) for _ in range(ptp)]
    dst_ids = [rng.permutation(model.num_blocks)[:7].astype(np.int32) for _ in range(dtp)]
    want = [[x.copy() for x in pool] for pool in dst]
    recvs = []
    for pr in pairs:
        p, d = pr.prefill_rank, pr.decode_rank
        recvs.append(dec[d].recv(peers[p, d][1], 42, dst_ids[d]))
        layers = range(model.num_layers)
        if mla:
            apply(model, src[p], want[d], src_ids[p], dst_ids[d], layers)
        else:
            apply_heads(p_layout[p], d_layout[d], src[p], want[d], src_ids[p], dst_ids[d], layers)
    groups = []
    for p in range(ptp):
        mine = [pr for pr in pairs if pr.prefill_rank == p]
        if mine:
            groups.append(kvxfer.SendGroup(pre[p].send(peers[p, pr.decode_rank][0], 42, src_ids[p],
                                                       dst_ids[pr.decode_rank]) for pr in mine))
    for layer in range(model.num_layers):
        for g in groups:
            g.layer_ready(layer)
    for g in groups:
        g.wait(timeout_s=30)
        assert g.done and g.writes_over and g.error is None
    for d in range(dtp):
        group = kvxfer.RecvGroup(r for r, pr in zip(recvs, pairs) if pr.decode_rank == d)
        group.wait(timeout_s=30)
        assert group.done and group.writes_over and group.layer_done(model.num_layers - 1) and not group.peers_lost
    for a in pre + dec:
        a.close()
    return dst, want


@pytest.mark.parametrize("ptp,dtp", [(1, 4), (2, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("head_major", [False, True], ids=["NHD", "HND"])
def test_prefill_and_decode_of_different_tp_sizes(ptp, dtp, head_major):
    model = kvxfer.KVLayout.vllm_flash(3, 16, 8, 4, 16, "bfloat16", head_major=head_major)
    dst, want = run_tp(model, ptp, dtp, tag=f"{ptp}{dtp}{int(head_major)}")
    for got_pool, want_pool in zip(dst, want):
        for g, w in zip(got_pool, want_pool):
            np.testing.assert_array_equal(g, w)


def test_replicated_prefill_heads_arrive_from_one_replica_each():
    model = kvxfer.KVLayout.vllm_flash(3, 16, 8, 2, 16, "bfloat16")  # 2 heads, prefill TP 4: each head twice
    dst, want = run_tp(model, 4, 2, tag="rep")
    for got_pool, want_pool in zip(dst, want):
        for g, w in zip(got_pool, want_pool):
            np.testing.assert_array_equal(g, w)


def test_mla_latents_from_one_prefill_rank_per_decode_rank():
    model = kvxfer.KVLayout.mla(3, 16, 8, 64, "bfloat16")
    dst, want = run_tp(model, 2, 3, tag="mla")
    for got_pool, want_pool in zip(dst, want):
        for g, w in zip(got_pool, want_pool):
            np.testing.assert_array_equal(g, w)


def tp1_with_two_tp2_ranks(tag, timeout_s):
    """An agent with a TP 1 pool and two with the TP 2 ranks' pools, connected over tcp. Returns (one, ranks,
    links): links[i] = (rank i as a peer of one, one as a peer of rank i)."""
    model = kvxfer.KVLayout.vllm_flash(2, 8, 4, 2, 8, "float16")
    one = kvxfer.Agent(f"{tag}-1", transport="tcp", interface="lo", timeout_s=timeout_s)
    ranks = [kvxfer.Agent(f"{tag}-r{i}", transport="tcp", interface="lo", timeout_s=timeout_s) for i in range(2)]
    one.register_pool(make_pool(model, 1), model)
    links = []
    for i, r in enumerate(ranks):
        rank = model.for_tp_rank(2, i)
        r.register_pool(make_pool(rank, 2 + i), rank)
        to_rank, to_one = one.add_peer(r.metadata()), r.add_peer(one.metadata())
        one.wait_connected(to_rank, 20)
        r.wait_connected(to_one, 20)
        links.append((to_rank, to_one))
    return one, ranks, links


def test_a_send_group_fails_when_one_of_its_sends_fails():
    a, bs, peers = tp1_with_two_tp2_ranks("group", 5)
    recv0 = bs[0].recv(peers[0][1], 1, [1, 2])
    recv1 = bs[1].recv(peers[1][1], 1, [1, 2])
    group = kvxfer.SendGroup([a.send(peers[i][0], 1, [3, 4], [1, 2]) for i in range(2)])
    recv1.cancel("decode rank 1 dropped the request")
    deadline = time.monotonic() + 10
    while group.sends[1].state != kvxfer.TransferState.FAILED and time.monotonic() < deadline:
        time.sleep(0.001)
    group.layer_ready(0, skip_failed=True)  # marks the live send only, raises nothing
    recv0.wait(layer=0, timeout_s=10)  # layer 0 arrives: nothing had marked it before
    with pytest.raises(errors.Cancelled, match="to peer 'group-r1' was cancelled by the receiver"):
        group.all_ready()  # the failed send refuses; the other one is marked all the same
    recv0.wait(timeout_s=10)
    with pytest.raises(errors.Cancelled, match="to peer 'group-r1' was cancelled by the receiver"):
        group.wait(timeout_s=10)
    assert group.state == kvxfer.TransferState.FAILED and isinstance(group.error, errors.Cancelled)
    for x in [a, *bs]:
        x.close()
    with pytest.raises(errors.InvalidArgument, match="at least one send"):
        kvxfer.SendGroup([])


def test_a_recv_group_fails_when_one_sender_fails_and_cancel_stops_the_others():
    """A TP 1 decode rank receives one request from two TP 2 prefill ranks: rank 1 aborts, the group fails at once
    (rank 0's recv still pending); cancelling the group stops rank 0's send too (Cancelled), and writes_over turns
    True once both are over."""
    d, ps, peers = tp1_with_two_tp2_ranks("rgroup", 10)
    group = kvxfer.RecvGroup(d.recv(peers[i][0], 5, [1, 2]) for i in range(2))
    with pytest.raises(errors.TransferTimeout, match="2 of the 2 recvs of transfer 5 not done within 0.2s "
                                                     "\\(peers 'rgroup-r0', 'rgroup-r1'\\)"):
        group.wait(timeout_s=0.2)
    sends = [ps[i].send(peers[i][1], 5, [3, 4], [1, 2]) for i in range(2)]
    sends[0].layer_ready(0)
    group.recvs[0].wait(layer=0, timeout_s=10)
    assert not group.layer_done(0)  # rank 1 has not sent layer 0
    sends[1].abort("prefill rank 1 hit an error")
    with pytest.raises(errors.TransferFailed, match="the sender abandoned transfer 5"):
        group.wait(timeout_s=10)  # returns at rank 1's failure while rank 0's recv is still pending
    assert group.state == kvxfer.TransferState.FAILED and group.recvs[0].state == kvxfer.TransferState.PENDING
    assert "sender abandoned" in str(group.error)
    group.cancel("decode gave the request up")
    with pytest.raises(errors.Cancelled, match="cancelled by the receiver"):
        sends[0].wait(timeout_s=10)
    deadline = time.monotonic() + 10
    while not group.writes_over and time.monotonic() < deadline:
        time.sleep(0.01)
    assert group.writes_over
    for x in [d, *ps]:
        x.close()
    with pytest.raises(errors.InvalidArgument, match="at least one recv"):
        kvxfer.RecvGroup([])
