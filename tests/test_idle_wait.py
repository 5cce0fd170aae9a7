"""Idle progress threads block on the completion queue's wait fd (KVXFER_IDLE_WAIT=fd, the default) instead of
spinning, and a transfer that starts while they sleep still lands exactly. KVXFER_IDLE_WAIT=poll keeps the
old spin-and-sleep loop; any other value is refused by name."""
import time

import pytest

import kvxfer
from kvxfer import errors
from tests.conftest import assert_exact_transfer, local_pair
from tests.reference import PRESETS


def transfer_after_idle(monkeypatch, mode, transport="tcp"):
    """Connect a pair, let it sit idle, then move 3 blocks; returns (sender stats, receiver stats) after checking
    that exactly the addressed blocks changed."""
    monkeypatch.setenv("KVXFER_IDLE_WAIT", mode)
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, transport, (f"idle-{mode}-s", f"idle-{mode}-r"))
    time.sleep(0.2)  # long past the 0.3 ms spin: a blocking agent is asleep in poll() now
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 1, [2, 5, 31], [7, 0, 19])
    return a.stats(), b.stats()


def test_idle_agents_block_and_wake_for_a_transfer(monkeypatch):
    sender, receiver = transfer_after_idle(monkeypatch, "fd")
    # a blocking agent sleeps in poll() at most 10 ms at a time: 200 ms idle means many blocks, on both sides
    assert sender["idle_waits"] > 0 and receiver["idle_waits"] > 0


def test_poll_mode_never_blocks(monkeypatch):
    sender, receiver = transfer_after_idle(monkeypatch, "poll")
    assert sender["idle_waits"] == 0 and receiver["idle_waits"] == 0


def test_fi_shm_without_a_wait_fd_still_transfers(monkeypatch):
    # shm answers -FI_ENOSYS to FI_WAIT_FD: the agent falls back to polling rather than failing
    sender, receiver = transfer_after_idle(monkeypatch, "fd", transport="fi_shm")
    assert sender["idle_waits"] == 0 and receiver["idle_waits"] == 0


def test_unknown_idle_wait_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("KVXFER_IDLE_WAIT", "block")
    with pytest.raises(errors.InvalidArgument, match="KVXFER_IDLE_WAIT='block' is not one of fd, poll"):
        kvxfer.Agent("idle-bad", transport="tcp", interface="lo")
