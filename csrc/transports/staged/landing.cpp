#include "transports/staged/landing.h"

#include <cstring>

#include "core/imm.h"

namespace kvxfer {

bool parse_landing(const uint8_t* slot, size_t slot_bytes, LandingBatch* out, std::string* why) {
  if (slot_bytes < kLandingDataOffset) {
    *why = "landing slot smaller than its header";
    return false;
  }
  LandingHeader& h = out->header;
  std::memcpy(&h, slot, sizeof(h));
  if (h.magic != LandingHeader::kMagic || h.version != LandingHeader::kVersion) {
    *why = "bad landing header magic or version";
    return false;
  }
  if (h.num_entries == 0 || h.num_entries > kLandingMaxEntries) {
    *why = "landing header names " + std::to_string(h.num_entries) + " entries (1.." +
           std::to_string(kLandingMaxEntries) + ")";
    return false;
  }
  if (h.granules == 0 || h.granules > ImmCode::kMaxGranules || h.layer >= ImmCode::kMaxLayers) {
    *why = "landing header: granules " + std::to_string(h.granules) + " or layer " + std::to_string(h.layer) +
           " out of range";
    return false;
  }
  if (h.data_bytes > slot_bytes - kLandingDataOffset) {
    *why = "landing header: " + std::to_string(h.data_bytes) + " data bytes do not fit the " +
           std::to_string(slot_bytes - kLandingDataOffset) + " bytes of a slot";
    return false;
  }
  out->entries.resize(h.num_entries);
  std::memcpy(out->entries.data(), slot + sizeof(LandingHeader), h.num_entries * sizeof(LandingEntry));
  uint64_t sum = 0;
  for (const auto& e : out->entries) {
    if (e.nbytes == 0) {
      *why = "landing entry of 0 bytes";
      return false;
    }
    sum += e.nbytes;
  }
  if (sum != h.data_bytes) {
    *why = "landing entries sum to " + std::to_string(sum) + " bytes, header says " + std::to_string(h.data_bytes);
    return false;
  }
  return true;
}

bool check_landing_bounds(const LandingBatch& batch, const std::vector<uint64_t>& region_bytes, std::string* why) {
  for (const auto& e : batch.entries) {
    if (e.dst_region >= region_bytes.size()) {
      *why = "landing entry names region " + std::to_string(e.dst_region) + " of a pool with " +
             std::to_string(region_bytes.size());
      return false;
    }
    const uint64_t size = region_bytes[e.dst_region];
    if (e.dst_offset > size || e.nbytes > size - e.dst_offset) {
      *why = "landing entry [" + std::to_string(e.dst_offset) + ", +" + std::to_string(e.nbytes) +
             ") lies outside region " + std::to_string(e.dst_region) + " (" + std::to_string(size) + " bytes)";
      return false;
    }
  }
  return true;
}

void write_landing_header(uint8_t* slot, const LandingHeader& header, const LandingEntry* entries) {
  std::memcpy(slot, &header, sizeof(header));
  std::memcpy(slot + sizeof(header), entries, header.num_entries * sizeof(LandingEntry));
}

}  // namespace kvxfer
