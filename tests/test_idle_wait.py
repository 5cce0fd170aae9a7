"""Idle progress threads block on the completion queue's wait fd (KVXFER_IDLE_WAIT=fd, the default) instead of
spinning, and a transfer that starts while they sleep still lands exactly. KVXFER_IDLE_WAIT=poll keeps the
old spin-and-sleep loop; any other value is refused by name. An agent waiting on a peer that does not answer its
connection (stopped, starved of CPU) sleeps too."""
import glob
import os
import signal
import time

import pytest

import kvxfer
from kvxfer import errors
from tests.conftest import UCX, assert_exact_from_remote, assert_exact_transfer, local_pair, wait_for
from tests.reference import PRESETS, make_pool


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


def progress_threads() -> dict[int, int]:
    """This process's kvxfer progress threads: {tid: CPU clock ticks used so far}."""
    ticks = {}
    for task in glob.glob(f"/proc/{os.getpid()}/task/*"):
        try:
            with open(f"{task}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended
            continue
        if stat[stat.index("(") + 1:stat.rindex(")")] == "kvxfer-progress":
            fields = stat[stat.rindex(")") + 2:].split()
            ticks[int(os.path.basename(task))] = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks


@pytest.mark.parametrize("transport", ["tcp", UCX])
def test_agent_waiting_on_a_stopped_peer_sleeps(remote, transport):
    # vLLM over ucx: the prefill agent spun a whole core while the decode worker it waited for (stopped here) owed
    # it UCX's connection reply; on 2 cores that starved the decode worker for the request's whole 15 s timeout.
    layout = PRESETS["vllm_flash"]()
    peer_md = remote.call("init", (transport, "vllm_flash", 31, [], 1, {}))
    os.kill(remote.proc.pid, signal.SIGSTOP)
    try:
        before = set(progress_threads())
        agent = kvxfer.Agent("idle-stopped-peer", transport=transport, interface="lo")
        wait_for(lambda: set(progress_threads()) - before, "the new agent's progress thread named")  # it names itself
        (tid,) = set(progress_threads()) - before
        dst = make_pool(layout, 32)
        agent.register_pool(dst, layout)
        peer = agent.add_peer(peer_md)  # connects and says HELLO to a peer that cannot answer
        time.sleep(0.2)
        t0 = progress_threads()[tid]
        time.sleep(2.0)
        used = (progress_threads()[tid] - t0) / os.sysconf("SC_CLK_TCK")
    finally:
        os.kill(remote.proc.pid, signal.SIGCONT)
    assert used < 0.4, f"the progress thread used {used:.2f} s of CPU in 2 s waiting on a stopped peer: it spins"
    # Once the peer runs again the connection completes, and a transfer lands exactly.
    remote.call("add_peer", agent.metadata())
    agent.wait_connected(peer, 20)
    assert_exact_from_remote(agent, peer, remote, layout, dst, 31, 1, [3, 1], [8, 2])


@pytest.mark.parametrize("transport", ["tcp", "cma", UCX])
def test_an_idle_connected_agent_wakes_about_ten_times_a_second(transport):
    """With no transfer live, deadlines and liveness are checked every 100 ms, not every 10 ms: two connected idle
    agents used to wake ~100 times a second each for nothing (2-5 ms of CPU per second apiece)."""
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, transport, (f"idle-tick-s-{transport}", f"idle-tick-r-{transport}"))
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 1, [2], [7])
    time.sleep(0.3)
    before = [x.stats()["idle_waits"] for x in (a, b)]
    time.sleep(2.0)
    woke = [x.stats()["idle_waits"] - w for x, w in zip((a, b), before)]
    assert all(w <= 40 for w in woke), f"idle agents woke {woke} times in 2 s (about 20 expected, 200 before)"
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 2, [3, 4], [8, 9])  # and wake at once for work
