// Landing slots: receiver-side staging, for destination pools the fabric cannot write (GPU memory on another host
// without GPU-direct RDMA, or any pool of an agent created with landing='always').
//
// The receiver owns one registered host ring (pinned where a GPU is usable) of max_peers x
// landing_slots slots; the slots of window w belong to the peer that sends with window w, so no two senders ever
// share one and no credit handshake is needed. A sender writes one staged batch into one of its landing slots as a
// single contiguous fabric write whose immediate has granules = 0 (never sent otherwise) and the landing slot index
// in the layer field:
//
//   slot bytes:  | LandingHeader (32) | LandingEntry x num_entries (16 each) | pad | data (entries' bytes in order) |
//                0                                                          kLandingDataOffset
//
// The receiver parses the header defensively (the bytes come from the wire: magic, version, counts, every entry
// within the destination pool's regions and the data within the slot), copies the data into its pool (host-to-
// device copies, or memcpy for a host pool), then counts the batch's granules for (transfer slot, layer) exactly as
// if a direct write had carried them, and hands the landing slot back with a LANDED control message.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace kvxfer {

struct LandingHeader {
  static constexpr uint32_t kMagic = 0x444c564b;  // "KVLD"
  static constexpr uint16_t kVersion = 1;
  uint32_t magic = kMagic;
  uint16_t version = kVersion;
  uint16_t num_entries = 0;
  uint32_t xfer_slot = 0;   // the transfer slot; must equal the immediate's
  uint32_t layer = 0;       // absolute layer the batch's granules count for
  uint32_t dst_pool = 0;    // the receiver's pool index
  uint32_t granules = 0;    // chunks the batch carries (1..ImmCode::kMaxGranules)
  uint64_t data_bytes = 0;  // sum of the entries' nbytes
};
static_assert(sizeof(LandingHeader) == 32, "landing header layout");

struct LandingEntry {
  uint64_t dst_offset = 0;  // byte offset into the destination region
  uint32_t dst_region = 0;
  uint32_t nbytes = 0;
};
static_assert(sizeof(LandingEntry) == 16, "landing entry layout");

constexpr uint32_t kLandingMaxEntries = 62;         // writes per batch
constexpr size_t kLandingDataOffset = 1024;         // header + 62 entries, rounded: data starts aligned
static_assert(sizeof(LandingHeader) + kLandingMaxEntries * sizeof(LandingEntry) <= kLandingDataOffset, "fits");
constexpr uint32_t kLandingMaxSlotsPerPeer = 256;   // the immediate's layer field carries the index
constexpr uint64_t kLandingRingKey = 0x1A4D;        // fabric key of the ring (pools use (pool + 1) << 16 | region)

struct LandingBatch {
  LandingHeader header;
  std::vector<LandingEntry> entries;
};

// Parses a landing slot's header against the slot size. Returns false with *why naming the first problem. Pool and
// region bounds are the receiver's to check (check_landing_bounds), since only it knows its pools.
bool parse_landing(const uint8_t* slot, size_t slot_bytes, LandingBatch* out, std::string* why);

// Every entry inside the pool's regions (region_bytes[i]: size of region i). Returns false with *why.
bool check_landing_bounds(const LandingBatch& batch, const std::vector<uint64_t>& region_bytes, std::string* why);

// Writes a header and its entries at the start of a slot (the sender's bounce slot).
void write_landing_header(uint8_t* slot, const LandingHeader& header, const LandingEntry* entries);

}  // namespace kvxfer
