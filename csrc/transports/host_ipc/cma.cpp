#include "transports/host_ipc/cma.h"

#include <sys/prctl.h>
#include <sys/uio.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <vector>

#include "core/errors.h"

namespace kvxfer {

namespace {

// Appends [base, base + n) to an iovec list, extending the last entry when the range follows it.
void append(iovec* v, size_t& count, const void* base, size_t n) {
  if (count && static_cast<char*>(v[count - 1].iov_base) + v[count - 1].iov_len == base) {
    v[count - 1].iov_len += n;
    return;
  }
  v[count++] = {const_cast<void*>(base), n};
}

// Moves the list's start forward by `bytes` (a partial copy stopped there).
void advance(iovec* v, size_t count, size_t& first, size_t bytes) {
  while (first < count && bytes >= v[first].iov_len) bytes -= v[first++].iov_len;
  if (first < count && bytes) {
    v[first].iov_base = static_cast<char*>(v[first].iov_base) + bytes;
    v[first].iov_len -= bytes;
  }
}

}  // namespace

void CmaCopier::copy(const CmaOp* ops, size_t count) {
  // Each side's ranges are merged where they follow each other, independently: the kernel copies the local byte
  // stream into the remote one, and its cost grows with remote entries (it pins each one's pages). A head slice of
  // token-major blocks is strided in the source but contiguous in the receiving rank's block: 16 local entries,
  // one remote.
  iovec local[kMaxIov], remote[kMaxIov];
  size_t i = 0;
  while (i < count) {
    size_t nl = 0, nr = 0, total = 0;
    for (; i < count; ++i) {
      const CmaOp& op = ops[i];
      const bool joins_local = nl && static_cast<const char*>(local[nl - 1].iov_base) + local[nl - 1].iov_len ==
                                         static_cast<const char*>(op.src);
      const bool joins_remote =
          nr && reinterpret_cast<uint64_t>(remote[nr - 1].iov_base) + remote[nr - 1].iov_len == op.remote_addr;
      if ((!joins_local && nl == kMaxIov) || (!joins_remote && nr == kMaxIov)) break;
      append(local, nl, op.src, op.nbytes);
      append(remote, nr, reinterpret_cast<const void*>(op.remote_addr), op.nbytes);
      total += op.nbytes;
    }
    // A partial copy is possible (a fault mid-way); resume from where it stopped rather than recopying.
    size_t done = 0, first_l = 0, first_r = 0;
    while (done < total) {
      ssize_t rc = process_vm_writev(pid_, local + first_l, nl - first_l, remote + first_r, nr - first_r, 0);
      if (rc < 0) {
        const int err = errno;
        KVXFER_CHECK(err != ESRCH, PeerLost, "peer process " << pid_ << " is gone (process_vm_writev: ESRCH)");
        KVXFER_CHECK(err != EFAULT, AccessViolation,
                     "process_vm_writev into peer " << pid_ << " hit an unmapped address (EFAULT): the peer freed "
                                                    "or never mapped the pool it exposed");
        KVXFER_THROW(TransferFailed, "process_vm_writev into peer " << pid_ << " failed: " << std::strerror(err));
      }
      KVXFER_CHECK(rc > 0, TransferFailed, "process_vm_writev into peer " << pid_ << " made no progress");
      done += static_cast<size_t>(rc);
      advance(local, nl, first_l, static_cast<size_t>(rc));
      advance(remote, nr, first_r, static_cast<size_t>(rc));
    }
  }
}

int yama_ptrace_scope() {
  std::ifstream f("/proc/sys/kernel/yama/ptrace_scope");
  int scope = -1;
  if (!(f >> scope)) return -1;
  return scope;
}

void apply_ptracer_setting() {
  const char* env = std::getenv("KVXFER_PTRACER");
  const std::string v = env ? env : "off";
  KVXFER_CHECK(v == "off" || v == "any", InvalidArgument,
               "KVXFER_PTRACER=" << v << ": use off (default) or any (same-host peers of this user may reach this "
                                         "process under Yama ptrace_scope 1)");
  // Without Yama the call fails (EINVAL) and nothing needs it: any process of this user may reach us already.
  if (v == "any") (void)prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
}

bool cma_probe(pid_t pid, uint64_t addr, uint64_t cookie, std::string* why) {
  uint64_t value = 0;
  iovec local{&value, sizeof(value)}, remote{reinterpret_cast<void*>(addr), sizeof(value)};
  ssize_t rc = process_vm_readv(pid, &local, 1, &remote, 1, 0);
  if (rc != sizeof(value)) {
    const int err = rc < 0 ? errno : 0;
    *why = std::string("process_vm_readv of the peer's probe failed: ") + (rc < 0 ? std::strerror(err) : "short read");
    const int scope = yama_ptrace_scope();
    if (err == EPERM && scope == 1)
      *why += " (Yama ptrace_scope=1: only a process's ancestors may reach it; start the peer with "
              "KVXFER_PTRACER=any to let processes of this user reach it)";
    else if (err == EPERM && scope >= 2)
      *why += " (Yama ptrace_scope=" + std::to_string(scope) + ": CMA between processes is off on this host)";
    else
      *why += " (different PID namespace, or ptrace not permitted)";
    return false;
  }
  if (value != cookie) {
    *why = "the peer's probe cookie did not match (a different process has that PID here)";
    return false;
  }
  return true;
}

}  // namespace kvxfer
