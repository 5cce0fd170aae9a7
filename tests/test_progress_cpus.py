"""KVXFER_PROGRESS_CPUS places the progress thread: inherit (default) keeps the creating thread's CPUs, all widens
it to every CPU the process may use (an engine that pinned its worker to a busy core), a list pins it; a value that
is not one, or names no usable CPU, is refused when the Agent is made, naming the variable."""
import os

import pytest

import kvxfer
from kvxfer import errors
from tests.conftest import open_fds, wait_for
from tests.test_idle_wait import progress_threads


def allowed_cpus(tid: int) -> set[int]:
    with open(f"/proc/{os.getpid()}/task/{tid}/status") as f:
        line = next(x for x in f if x.startswith("Cpus_allowed_list:"))
    cpus = set()
    for part in line.split(":", 1)[1].strip().split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def new_agent_progress_cpus(monkeypatch, value):
    """Cpus allowed to the progress thread of an Agent made with KVXFER_PROGRESS_CPUS=value (None: unset) by a
    thread pinned to CPU 0."""
    if value is None:
        monkeypatch.delenv("KVXFER_PROGRESS_CPUS", raising=False)
    else:
        monkeypatch.setenv("KVXFER_PROGRESS_CPUS", value)
    before, mine = set(progress_threads()), os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})  # as an engine pins its worker thread
    try:
        agent = kvxfer.Agent("progress-cpus", transport="tcp", interface="lo")
    finally:
        os.sched_setaffinity(0, mine)
    wait_for(lambda: set(progress_threads()) - before, "the new agent's progress thread named")
    (tid,) = set(progress_threads()) - before
    cpus = allowed_cpus(tid)
    agent.close()
    return cpus


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to tell the placements apart")
def test_progress_thread_placement(monkeypatch):
    machine = os.sched_getaffinity(0)
    assert new_agent_progress_cpus(monkeypatch, None) == {0}  # inherited from the pinned creator
    assert new_agent_progress_cpus(monkeypatch, "inherit") == {0}
    assert new_agent_progress_cpus(monkeypatch, "all") == machine
    last = max(machine)
    assert new_agent_progress_cpus(monkeypatch, str(last)) == {last}
    assert new_agent_progress_cpus(monkeypatch, f"0-{last}") == set(range(last + 1)) & machine


@pytest.mark.parametrize("value, why", [("bogus", "'bogus' is not a CPU number"), ("3-1", "'3-1' is not"),
                                        ("5000", "'5000' is not a CPU number or range below"),
                                        ("1000", "none of those CPUs is available")])
def test_bad_progress_cpus_refused_by_name(monkeypatch, value, why):
    monkeypatch.setenv("KVXFER_PROGRESS_CPUS", value)
    before, fds = set(progress_threads()), open_fds()
    for _ in range(3):
        with pytest.raises(errors.InvalidArgument, match=f"KVXFER_PROGRESS_CPUS='{value}': {why}"):
            kvxfer.Agent("progress-cpus-bad", transport="tcp", interface="lo")
    assert set(progress_threads()) <= before  # the refused agents' threads did not stay behind
    assert open_fds() == fds  # nor their endpoints' sockets or wake fds
