"""What this GPU machine's runtime allows, in a few seconds, before anything is built: the calls kvxfer's same-host
GPU paths rest on. Some GPU hosts run under gVisor, whose pidfd and CUDA IPC support is not known ahead.

    python3 scripts/gpu_probe.py      (scripts/gpu_check.sh probe)

Prints one line per check (ok / FAILED / skipped, with why); exits 0 whatever it finds: it informs, the tests judge.
"""
import ctypes
import multiprocessing as mp
import os
import platform
import sys


def pidfd_getfd() -> str:
    """VMM (expandable segments) sharing copies the owner's exported fds with pidfd_open + pidfd_getfd."""
    libc = ctypes.CDLL(None, use_errno=True)
    r, w = os.pipe()
    try:
        pidfd = libc.syscall(434, os.getpid(), 0)  # SYS_pidfd_open
        if pidfd < 0:
            return f"FAILED pidfd_open: errno {ctypes.get_errno()}"
        fd = libc.syscall(438, pidfd, r, 0)  # SYS_pidfd_getfd
        os.close(pidfd)
        if fd < 0:
            return f"FAILED pidfd_getfd: errno {ctypes.get_errno()}"
        os.close(fd)
        return "ok"
    finally:
        os.close(r)
        os.close(w)


def _fd_owner(conn):
    r, w = os.pipe()
    conn.send((os.getpid(), r))
    conn.recv()


def _fd_taker(conn, pid, fd):
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(434, pid, 0)
    if pidfd < 0:
        conn.send(f"FAILED pidfd_open: errno {ctypes.get_errno()}")
        return
    got = libc.syscall(438, pidfd, fd, 0)
    conn.send("ok" if got >= 0 else f"FAILED pidfd_getfd: errno {ctypes.get_errno()}")


def sibling_pidfd_getfd() -> str:
    """Prefill and decode are siblings, not parent and child: Yama's ptrace_scope=1 (Ubuntu's default) and Docker's
    seccomp profile allow pidfd_getfd / process_vm_writev to descendants only. Then the VMM and doorbell paths and
    cma fall back (add_peer names why)."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = f"yama ptrace_scope={f.read().strip()}"
    except OSError:
        scope = "no yama"
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    owner = ctx.Process(target=_fd_owner, args=(b,), daemon=True)
    owner.start()
    try:
        if not a.poll(60):
            return f"FAILED: the fd owner did not start within 60 s ({scope})"
        pid, fd = a.recv()
        c, d = ctx.Pipe()
        taker = ctx.Process(target=_fd_taker, args=(d, pid, fd), daemon=True)
        taker.start()
        result = c.recv() if c.poll(30) else "FAILED: no answer in 30 s"
        taker.join(5)
    finally:
        a.send("done")
        owner.join(5)
    return f"{result} ({scope})"


def _cma_child(conn):
    buf = ctypes.create_string_buffer(b"kvxfer-cma-probe", 64)
    conn.send(ctypes.addressof(buf))
    conn.recv()


def process_vm_writev() -> str:
    """The cma path (host pools between processes, the staged path's copy-out) writes with process_vm_writev."""
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_cma_child, args=(b,), daemon=True)
    p.start()
    try:
        if not a.poll(60):
            return "FAILED: the child did not start within 60 s"
        addr = a.recv()

        class IoVec(ctypes.Structure):
            _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

        src = ctypes.create_string_buffer(b"written", 8)
        local, remote = IoVec(ctypes.addressof(src), 8), IoVec(addr, 8)
        libc = ctypes.CDLL(None, use_errno=True)
        n = libc.process_vm_writev(p.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        # parent -> child only: between siblings (prefill and decode) Yama's ptrace_scope 1 may still refuse it
        return ("ok (parent to child)" if n == 8
                else f"FAILED: errno {ctypes.get_errno()} (ptrace scope / container policy)")
    finally:
        a.send("done")
        p.join(5)


def _ipc_child(q, t):
    q.put(float(t.sum().item()))


def cuda_ipc() -> str:
    """cuda_ipc maps a peer's pool with CUDA IPC handles; torch.multiprocessing shares CUDA tensors the same way."""
    try:
        import torch
        import torch.multiprocessing as tmp
    except ImportError:
        return "skipped: no torch"
    if not torch.cuda.is_available():
        return "skipped: no CUDA device visible to torch"
    ctx = tmp.get_context("spawn")
    q = ctx.Queue()
    t = torch.ones(1 << 18, device="cuda")
    p = ctx.Process(target=_ipc_child, args=(q, t), daemon=True)  # a hung child must not hold the probe's exit
    p.start()
    try:
        got = q.get(timeout=60)
    except Exception as e:  # noqa: BLE001 - whatever stopped the child is the finding
        return f"FAILED: {type(e).__name__}: {e}"
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
    return "ok" if got == float(1 << 18) else f"FAILED: the child read {got}"


def main() -> int:
    print(f"kernel {platform.release()} ({'gVisor?' if platform.release().startswith('4.4.0') else 'native'}), "
          f"python {sys.version.split()[0]}")
    for name, check in (("pidfd_getfd", pidfd_getfd), ("pidfd_getfd sibling", sibling_pidfd_getfd),
                        ("process_vm_writev", process_vm_writev),
                        ("cuda_ipc (torch)", cuda_ipc)):
        try:
            print(f"{name:20s} {check()}", flush=True)
        except Exception as e:  # noqa: BLE001 - a probe reports, it does not stop
            print(f"{name:20s} FAILED: {type(e).__name__}: {e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
