#include "transports/host_ipc/cma.h"

#include <sys/uio.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "core/errors.h"

namespace kvxfer {

void CmaCopier::copy(const CmaOp* ops, size_t count) {
  iovec local[kMaxIov], remote[kMaxIov];
  size_t i = 0;
  while (i < count) {
    const size_t n = std::min(kMaxIov, count - i);
    size_t total = 0;
    for (size_t k = 0; k < n; ++k) {
      local[k] = {const_cast<void*>(ops[i + k].src), ops[i + k].nbytes};
      remote[k] = {reinterpret_cast<void*>(ops[i + k].remote_addr), ops[i + k].nbytes};
      total += ops[i + k].nbytes;
    }
    // A partial copy is possible (a fault mid-way); resume from where it stopped rather than recopying.
    size_t done = 0;
    size_t first = 0;
    while (done < total) {
      ssize_t rc = process_vm_writev(pid_, local + first, n - first, remote + first, n - first, 0);
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
      size_t left = static_cast<size_t>(rc);
      while (first < n && left >= local[first].iov_len) left -= local[first++].iov_len;
      if (first < n && left) {
        local[first].iov_base = static_cast<char*>(local[first].iov_base) + left;
        local[first].iov_len -= left;
        remote[first].iov_base = static_cast<char*>(remote[first].iov_base) + left;
        remote[first].iov_len -= left;
      }
    }
    i += n;
  }
}

bool cma_probe(pid_t pid, uint64_t addr, uint64_t cookie, std::string* why) {
  uint64_t value = 0;
  iovec local{&value, sizeof(value)}, remote{reinterpret_cast<void*>(addr), sizeof(value)};
  ssize_t rc = process_vm_readv(pid, &local, 1, &remote, 1, 0);
  if (rc != sizeof(value)) {
    *why = std::string("process_vm_readv of the peer's probe failed: ") + (rc < 0 ? std::strerror(errno) : "short read") +
           " (different PID namespace, or ptrace not permitted)";
    return false;
  }
  if (value != cookie) {
    *why = "the peer's probe cookie did not match (a different process has that PID here)";
    return false;
  }
  return true;
}

}  // namespace kvxfer
