// Sharing cuMem/VMM memory (PyTorch's expandable segments, cuMemCreate pools) with a same-host peer, where legacy
// CUDA IPC handles cannot name it.
//
// A VMM range is a run of physical allocations mapped back to back. The owner exports each one as a shareable
// handle of a type the allocation was created with: a fabric handle (64 opaque bytes, CU_MEM_HANDLE_TYPE_FABRIC)
// when it allows one, else a POSIX file descriptor, which stays open in the owner and which the peer copies out of
// the owner's process with pidfd_getfd (the same permission CMA and the doorbell need). The peer imports every
// piece, maps them back to back in a VA range of its own and enables access from its copy device; from then on the
// mapping is used exactly like a CUDA IPC mapping.
//
// Both halves throw TransportUnavailable / RegistrationFailed naming the failed step; without CUDA they throw
// saying the build has none.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace kvxfer {
namespace gpu {

struct VmmPiece {
  uint64_t start = 0;            // owner's virtual address of this physical allocation's mapping
  uint64_t size = 0;
  int32_t fd = -1;               // POSIX handle: the fd number in the owner's process; -1 with a fabric handle
  std::vector<uint8_t> fabric{}; // fabric handle bytes (empty with a POSIX handle)
};

constexpr uint32_t kMaxVmmPieces = 65536;  // per region (metadata limit)
constexpr size_t kFabricHandleBytes = 64;

// Exports the physical allocations behind [addr, addr + nbytes) of `device`. Returns false with *why when the range
// is not VMM memory or an allocation has no shareable handle type; throws on a driver failure mid-export (fds
// exported so far are closed).
bool export_vmm_range(uint64_t addr, uint64_t nbytes, int device, std::vector<VmmPiece>* pieces, std::string* why);
// Closes the owner's exported fds (the agent keeps them open while it lives, so peers can fetch them).
void close_vmm_export(const std::vector<VmmPiece>& pieces);

// The owner's pieces imported and mapped back to back here; base() is where pieces[0].start lands.
class VmmMapping {
 public:
  VmmMapping(pid_t owner_pid, const std::vector<VmmPiece>& pieces, int local_device);
  ~VmmMapping();
  VmmMapping(const VmmMapping&) = delete;
  VmmMapping& operator=(const VmmMapping&) = delete;
  uint64_t base() const { return base_; }

 private:
  void release();
  void unmap_pieces(uint64_t through);  // the pieces mapped in [base_, base_ + through), one cuMemUnmap each
  uint64_t base_ = 0, bytes_ = 0;
  std::vector<uint64_t> piece_bytes_;
  int device_ = -1;
};

}  // namespace gpu
}  // namespace kvxfer
