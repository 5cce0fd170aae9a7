// StagingRing: the pinned host bounce buffers of the staged path (GPU memory -> pinned host -> network), for
// fabrics that cannot read GPU memory (no FI_HMEM) and same-host peers whose pool is host memory.
//
// The ring is num_slots slots of slot_bytes each, registered once with the fabric transport. The progress thread
// takes a slot, copies a batch of chunks into it (the GPU copy engines, or memcpy for host sources), and once the
// copy has landed posts the network write from the slot; the slot comes back when that write completes. With
// several slots in flight the copy of batch i overlaps the write of batch i-1.
//
// Memory: page-locked and mapped (cudaHostAlloc) when made for a GPU's copies, so device-to-host copies run at
// copy-engine speed and gather kernels reach it; otherwise page-aligned ordinary memory (host sources: a process
// that moves only host memory never creates a CUDA context, not even on a machine with GPUs). A ring made for host
// sources is page-locked in place (pin_for) when a GPU first needs it.
// Threading: progress thread only, except the constructor and pin_for (the caller holds the agent's
// transport_mu_, which the progress thread holds while it works).
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "transports/transport.h"

namespace kvxfer {

class StagingRing {
 public:
  static constexpr size_t kDefaultSlotBytes = 4u << 20;
  static constexpr size_t kDefaultSlots = 16;
  static constexpr uint64_t kDefaultKey = 0x57A6ED;  // the fabric key it registers under

  // populate: touch every page now (no page faults in the pipeline). Off for a ring most of whose slots may never
  // be written (landing slots: a peer's share is touched only once it sends through them).
  // device: the GPU whose copies fill or drain the slots (page-locked for it), or -1 for host sources only.
  StagingRing(Transport& transport, size_t slot_bytes, size_t num_slots, uint64_t key = kDefaultKey,
              bool populate = true, int device = -1);
  ~StagingRing();
  StagingRing(const StagingRing&) = delete;
  StagingRing& operator=(const StagingRing&) = delete;

  size_t slot_bytes() const { return slot_bytes_; }
  size_t num_slots() const { return num_slots_; }
  // Page-locks a ring made for host sources for copies by `device` (no-op once pinned; best effort: copies into
  // memory that could not be page-locked still work, at pageable-memory speed).
  void pin_for(int device);
  bool pinned() const { return pinned_.load(std::memory_order_acquire); }
  // Kernels of any GPU may use the slots' addresses (gather copies); else only the copy engines read them.
  bool device_reachable() const { return reachable_.load(std::memory_order_acquire); }
  size_t free_slots() const { return free_.size(); }
  int acquire();  // a free slot, or -1 when all are in flight
  void release(int slot);
  uint8_t* slot_ptr(int slot) const { return base_ + static_cast<size_t>(slot) * slot_bytes_; }
  void* desc() const { return key_.desc; }
  uint64_t rkey() const { return key_.rkey; }
  uint8_t* base() const { return base_; }

 private:
  Transport& transport_;
  size_t slot_bytes_, num_slots_;
  uint8_t* base_ = nullptr;
  enum class Owner { Mmap, CudaHostAlloc } owner_ = Owner::Mmap;
  int pinned_device_ = -1;  // the device it was allocated or page-locked for
  bool pin_tried_ = false;  // pin_for (callers hold the agent's transport_mu_)
  std::atomic<bool> pinned_{false}, reachable_{false};
  MemoryKey key_;
  std::vector<int> free_;

  void free_memory();
};

}  // namespace kvxfer
