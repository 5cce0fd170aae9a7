// ImmCode: the 32-bit immediate carried by every data write (fi_writedata / FI_REMOTE_CQ_DATA).
//
//   31          20 19       12 11          0
//  +--------------+-----------+-------------+
//  |  slot (12)   | layer (8) | granules(12)|
//  +--------------+-----------+-------------+
//
// slot     : the sender-chosen transfer slot for this (sender, receiver) pair; bound to the engine's transfer id by
//            a BEGIN control message. 4096 per receiver, one window of them per sending peer (below).
// layer    : absolute layer index, 0..255.
// granules : how many (block, plane) chunks of the layout this write carries, 1..4095. Writes larger than that are
//            split by the plan.
//
// Why granules and not "one imm per block" or "the last write": the receiver knows its destination blocks but not
// the sender's source contiguity, so it cannot predict how many writes merging produces. Counting chunks makes the
// contract exact and order-free: layer L of a transfer is complete exactly when the sum of granules seen for
// (slot, L) equals num_dst_blocks * num_planes, whatever the merging, splitting, endpoint spreading or arrival
// order. A granule count of 0 is never sent (a zero-byte signal write carries the granules of data that another
// path, such as the CMA copy, already placed).
#pragma once
#include <cstdint>

namespace kvxfer {

struct ImmCode {
  static constexpr uint32_t kSlotBits = 12, kLayerBits = 8, kGranuleBits = 12;
  static constexpr uint32_t kMaxSlots = 1u << kSlotBits;            // 4096
  // A receiver gives each peer its own window of slots (in its HELLO), so the slot alone says which peer an
  // immediate came from: rxm-based providers (tcp, verbs) report no source for remote-write completions.
  // The window's size is the receiver's: kMaxSlots / max_peers (AgentOptions::max_peers; the default 32 peers
  // leaves 128 transfers in flight per (sender, receiver) pair, 256 peers leave 16). A sender takes whatever
  // window the HELLO names, so agents created with different max_peers talk to each other.
  // A failed send's slot stays quarantined until the receiver has counted every granule the sender posted for it
  // (ABORT carries the total, ABORT_ACK hands the slot back), so a late write can never land in a reused slot.
  static constexpr uint32_t kDefaultMaxPeers = 32;
  static constexpr uint32_t kMaxPeersLimit = 1024;                  // windows of 4 slots
  static constexpr uint32_t kMinWindow = kMaxSlots / kMaxPeersLimit;
  static constexpr bool valid_max_peers(uint32_t n) { return n >= 1 && n <= kMaxPeersLimit && (n & (n - 1)) == 0; }
  // A window a HELLO may name: a power of two of kMinWindow.. kMaxSlots slots, aligned to its size.
  static constexpr bool valid_window(uint32_t base, uint32_t size) {
    return size >= kMinWindow && size <= kMaxSlots && (size & (size - 1)) == 0 && base % size == 0 &&
           base < kMaxSlots;
  }
  static constexpr uint32_t kMaxLayers = 1u << kLayerBits;          // 256
  static constexpr uint32_t kMaxGranules = (1u << kGranuleBits) - 1;  // 4095 chunks per write

  static constexpr uint32_t encode(uint32_t slot, uint32_t layer, uint32_t granules) {
    return (slot << (kLayerBits + kGranuleBits)) | (layer << kGranuleBits) | granules;
  }
  static constexpr uint32_t slot(uint32_t imm) { return imm >> (kLayerBits + kGranuleBits); }
  static constexpr uint32_t layer(uint32_t imm) { return (imm >> kGranuleBits) & (kMaxLayers - 1); }
  static constexpr uint32_t granules(uint32_t imm) { return imm & kMaxGranules; }
};

static_assert(ImmCode::slot(ImmCode::encode(4095, 255, 4095)) == 4095, "imm slot field");
static_assert(ImmCode::layer(ImmCode::encode(4095, 255, 4095)) == 255, "imm layer field");
static_assert(ImmCode::granules(ImmCode::encode(7, 3, 4095)) == 4095, "imm granule field");

}  // namespace kvxfer
