#include "transports/staged/staging_ring.h"

#include <sys/mman.h>

#include "core/errors.h"
#include "gpu/cuda_device.h"

namespace kvxfer {

StagingRing::StagingRing(Transport& transport, size_t slot_bytes, size_t num_slots, uint64_t key, bool populate,
                         int device)
    : transport_(transport), slot_bytes_(slot_bytes), num_slots_(num_slots) {
  KVXFER_CHECK(slot_bytes > 0 && num_slots > 0, InvalidArgument, "a staging ring needs slots of > 0 bytes");
  const size_t total = slot_bytes * num_slots;
  base_ = static_cast<uint8_t*>(gpu::alloc_pinned(total, device));
  if (base_) {
    owner_ = Owner::CudaHostAlloc;
    pinned_device_ = device;
    pinned_ = reachable_ = true;  // mapped, portable; under unified addressing its address is its device pointer
  } else {
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | (populate ? MAP_POPULATE : 0),
                   -1, 0);
    KVXFER_CHECK(p != MAP_FAILED, RegistrationFailed, "could not allocate " << total << " bytes of staging buffers");
    base_ = static_cast<uint8_t*>(p);
  }
  try {
    key_ = transport_.register_memory(base_, total, key, -1);
  } catch (...) {
    free_memory();
    throw;
  }
  for (size_t s = num_slots; s-- > 0;) free_.push_back(static_cast<int>(s));
}

StagingRing::~StagingRing() {
  transport_.deregister_memory(key_);
  free_memory();
}

void StagingRing::free_memory() {
  if (owner_ == Owner::CudaHostAlloc) {
    gpu::free_pinned(base_, pinned_device_);
    return;
  }
  if (pinned_) gpu::unpin_host(base_, pinned_device_);
  munmap(base_, slot_bytes_ * num_slots_);
}

void StagingRing::pin_for(int device) {
  if (pinned_ || pin_tried_ || device < 0) return;
  pin_tried_ = true;  // a refusal is not retried at every send (each try locks the whole ring again)
  const gpu::HostPin pin = gpu::pin_host(base_, slot_bytes_ * num_slots_, device);
  if (pin == gpu::HostPin::None) return;
  pinned_device_ = device;
  reachable_ = pin == gpu::HostPin::Mapped;
  pinned_ = true;
}

int StagingRing::acquire() {
  if (free_.empty()) return -1;
  const int s = free_.back();
  free_.pop_back();
  return s;
}

void StagingRing::release(int slot) {
  KVXFER_ASSERT(slot >= 0 && static_cast<size_t>(slot) < num_slots_);
  free_.push_back(slot);
}

}  // namespace kvxfer
