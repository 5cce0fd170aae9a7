#include "transports/staged/staging_ring.h"

#include <sys/mman.h>

#include "core/errors.h"
#include "gpu/cuda_device.h"

namespace kvxfer {

StagingRing::StagingRing(Transport& transport, size_t slot_bytes, size_t num_slots, uint64_t key, bool populate)
    : transport_(transport), slot_bytes_(slot_bytes), num_slots_(num_slots) {
  KVXFER_CHECK(slot_bytes > 0 && num_slots > 0, InvalidArgument, "a staging ring needs slots of > 0 bytes");
  const size_t total = slot_bytes * num_slots;
  base_ = static_cast<uint8_t*>(gpu::alloc_pinned(total));
  pinned_ = base_ != nullptr;
  if (!base_) {
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | (populate ? MAP_POPULATE : 0),
                   -1, 0);
    KVXFER_CHECK(p != MAP_FAILED, RegistrationFailed, "could not allocate " << total << " bytes of staging buffers");
    base_ = static_cast<uint8_t*>(p);
  }
  try {
    key_ = transport_.register_memory(base_, total, key, -1);
  } catch (...) {
    if (pinned_) gpu::free_pinned(base_);
    else munmap(base_, total);
    throw;
  }
  for (size_t s = num_slots; s-- > 0;) free_.push_back(static_cast<int>(s));
}

StagingRing::~StagingRing() {
  transport_.deregister_memory(key_);
  if (pinned_) gpu::free_pinned(base_);
  else munmap(base_, slot_bytes_ * num_slots_);
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
