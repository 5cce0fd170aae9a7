"""Agent.wait_any: an engine with many transfers open sleeps until one of them ends (the agent counts ended transfers
in C++), instead of polling each."""
import threading
import time

import numpy as np

from tests.conftest import local_pair
from tests.reference import PRESETS


def _pair(tag):
    return local_pair(PRESETS["vllm_flash"](), "tcp", (f"wa-s-{tag}", f"wa-r-{tag}"), timeout_s=30)


def test_wakes_when_one_of_the_transfers_ends_and_not_for_others():
    a, b, pb, pa, _, _ = _pair("wake")
    r1, r2, r3 = (b.recv(pa, x, [x]) for x in (1, 2, 3))
    s3 = a.send(pb, 3, [0], [3])
    s3.all_ready()
    r3.wait(timeout_s=10)
    # r3 ended (another transfer of this agent): not one of those waited on, so the wait runs out
    assert b.wait_any([r1, r2], timeout_s=0.3) is False
    threading.Timer(0.2, lambda: a.send(pb, 2, [1], [2]).all_ready()).start()
    t0 = time.monotonic()
    assert b.wait_any([r1, r2], timeout_s=20) is True
    assert time.monotonic() - t0 < 15  # woken by r2's end, not by the timeout
    assert r2.done and r1.state.name == "PENDING"
    assert b.wait_any([r1, r2], timeout_s=0) is True  # already ended: at once
    a.close()
    b.close()


def test_sends_and_groups_too():
    import kvxfer

    a, b, pb, pa, _, _ = _pair("groups")
    recvs = [b.recv(pa, x, [x]) for x in (4, 5)]
    sends = [a.send(pb, x, [x], [x]) for x in (4, 5)]
    group = kvxfer.SendGroup(sends)
    assert a.wait_any([group], timeout_s=0.2) is False
    group.all_ready()
    assert a.wait_any([group], timeout_s=20) is True and group.done
    assert b.wait_any([kvxfer.RecvGroup(recvs)], timeout_s=20) is True
    np.testing.assert_equal([r.done for r in recvs], [True, True])
    a.close()
    b.close()
