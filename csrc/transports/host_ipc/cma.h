// Same-host host-memory path: the sender copies straight into the receiver's registered pool with
// process_vm_writev (cross-memory attach), one syscall per up to kMaxIov chunks, then signals the granules through
// the receiver's doorbell ring (doorbell.h), or the fabric endpoint with zero-byte immediate writes where the ring
// cannot be mapped. The copy is synchronous, so the bytes are in place before their immediate is posted. Chosen for peers on the same host when a CMA read of the peer's probe cookie succeeds
// (same kernel, same PID namespace, ptrace permission); libfabric's shm provider reached only ~0.55 of a CMA copy.
#pragma once
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace kvxfer {

struct CmaOp {
  const void* src;
  uint64_t remote_addr;
  size_t nbytes;
};

class CmaCopier {
 public:
  static constexpr size_t kMaxIov = 1024;  // IOV_MAX
  explicit CmaCopier(pid_t pid) : pid_(pid) {}
  // Copies every op. Throws PeerLost if the process is gone, AccessViolation on EFAULT, TransferFailed otherwise.
  void copy(const CmaOp* ops, size_t count);

 private:
  pid_t pid_;
};

// True when this process can read `cookie` at `addr` in `pid`; *why says what failed otherwise.
bool cma_probe(pid_t pid, uint64_t addr, uint64_t cookie, std::string* why);

// Yama's /proc/sys/kernel/yama/ptrace_scope, or -1 without Yama. At 1 (Ubuntu's default) a process may reach
// (process_vm_writev, pidfd_getfd) only its descendants, and those that declared it their tracer: sibling
// processes, such as a prefill and a decode worker launched apart, cannot.
int yama_ptrace_scope();
// KVXFER_PTRACER: "off" (default) leaves this process as it is; "any" declares every process of this user its
// possible tracer (prctl PR_SET_PTRACER_ANY), so same-host peers reach it by CMA, doorbell rings and VMM handles
// under ptrace_scope 1. It also lets them read and write all of its memory: for hosts whose processes of this user
// are trusted. Throws InvalidArgument for another value.
void apply_ptracer_setting();

}  // namespace kvxfer
