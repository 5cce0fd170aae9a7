"""kvxfer.bench.soak as a test: sustained traffic with cancels, aborts, a sender killed and restarted, a live
sender removed and one stopped until the heartbeat ends it, judged byte for byte (every completed request, then every block whose content is known), with
every failed request settled (writes_over) and a final request per sender completing (no slot leaked)."""
import numpy as np
import pytest

from kvxfer.bench import soak
from tests.conftest import UCX


# ucx: a sender killed mid-transfer used to abort the receiving process inside UCX 1.13 (its emulated puts)
@pytest.mark.parametrize("transport", ["tcp", "cma", UCX])
def test_sustained_traffic_with_restarts_and_removals_stays_exact(transport):
    result = soak.run(transport, seconds=7, senders=2, in_flight=4, chaos_every_s=1.0, seed=7)
    assert result["mismatched_blocks"] == 0, result["mismatch_examples"]
    assert result["unsettled"] == 0 and result["final_requests_done"] == 2
    assert result["restarts"] >= 1 and result["removals"] >= 1 and result["stops"] >= 1 and result["requests_struck"] > 0
    assert result["readds"] >= 1  # the same agent removed and added again at once: a new association
    failed = result["failed"]
    assert failed.get("Cancelled", 0) > 0 and failed.get("TransferFailed", 0) > 0  # receiver cancels, sender aborts
    assert failed.get("PeerUnknown", 0) + failed.get("PeerLost", 0) > 0  # restarts and removals ended live requests
    assert result["completed"] > 100 and result["blocks_checked_at_end"] > 0
    assert result["fds_after"] <= result["fds_before"] + 4  # removed and restarted peers leave no connection


def test_senders_on_another_host_are_fenced_and_their_blocks_reused_exactly():
    """--elsewhere: the senders run under host names of their own, so a stopped or killed one's recvs settle only
    by its keys closing (tcp per-peer keys); a stopped one runs again only after its blocks went to new requests,
    where any write it still had in flight would show as a mismatch."""
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to give the senders host names of their own (unshare CLONE_NEWUTS)")
    result = soak.run("tcp", seconds=7, senders=2, in_flight=4, chaos_every_s=1.0, seed=11, chaos=("stop", "restart"),
                      elsewhere=True)
    assert result["mismatched_blocks"] == 0, result["mismatch_examples"]
    assert result["unsettled"] == 0 and result["final_requests_done"] == 2
    assert result["stops"] >= 1 and result["restarts"] >= 1 and result["peers_fenced"] >= 2
    assert result["fds_after"] <= result["fds_before"] + 4


def test_the_soak_catches_a_block_changed_behind_its_back():
    # The judge itself: a byte changed in a block whose content is known must be reported by the final check.
    s = soak.Soak("tcp", 1, 2, 0.001, 0, 3, None)
    try:
        s.drive(1.0)
        block = next(iter(s.known))
        soak.planes_view(s.dst[3], s.lay)[1, block, 100] ^= np.uint32(1)
        result = s.finish()
    finally:
        s.close()
    assert result["mismatched_blocks"] == 1
    assert f"final check: blocks [{block}]" in result["mismatch_examples"][0]
