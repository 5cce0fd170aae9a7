// The data active message of the UCX transport (ucx_transport.cpp): one write, carried as
//
//   header: DataHeader | pieces x DataPiece        data: the pieces' bytes, back to back
//
// The receiver trusts none of it: check_data_am() accepts a message only when its header is whole and versioned,
// the pieces' lengths add up to the data exactly, and every piece lies inside the memory the receiver exported
// under the key it names. Header-only and free of UCX, so the core module can test it (kvxfer._C).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace kvxfer {
namespace ucx_data {

constexpr uint32_t kMagic = 0x4b584457;  // "WDXK"
constexpr uint32_t kMaxPieces = 16;

struct DataHeader {
  uint32_t magic = kMagic;
  uint32_t pieces = 0;
  uint32_t imm = 0;
  uint32_t has_imm = 0;  // 0 or 1
};
struct DataPiece {
  uint64_t key;          // the receiver's registration (its exported key)
  uint64_t remote_addr;  // the receiver's virtual address, inside that registration
  uint64_t nbytes;
};
struct Region {
  uint64_t base = 0, size = 0;
};

// Fills *h and pieces[] and returns "" when the message may be copied as it says; otherwise why not.
// region_of(key) returns the Region exported under key, or nullptr.
template <typename RegionOf>
std::string check(const uint8_t* header, size_t header_len, size_t data_len, RegionOf region_of, DataHeader* h,
                  DataPiece* pieces) {
  if (header_len < sizeof(DataHeader)) return "header of " + std::to_string(header_len) + " bytes";
  std::memcpy(h, header, sizeof(DataHeader));
  if (h->magic != kMagic) return "bad magic";
  if (h->pieces > kMaxPieces) return std::to_string(h->pieces) + " pieces (at most " + std::to_string(kMaxPieces) + ")";
  if (h->has_imm > 1) return "bad immediate flag";
  if (header_len != sizeof(DataHeader) + h->pieces * sizeof(DataPiece))
    return "header of " + std::to_string(header_len) + " bytes for " + std::to_string(h->pieces) + " pieces";
  std::memcpy(pieces, header + sizeof(DataHeader), h->pieces * sizeof(DataPiece));
  uint64_t total = 0;
  for (uint32_t i = 0; i < h->pieces; ++i) {
    const DataPiece& p = pieces[i];
    if (p.nbytes > data_len - total || p.nbytes == 0)
      return "piece " + std::to_string(i) + " of " + std::to_string(p.nbytes) + " bytes does not fit the data";
    total += p.nbytes;
    const Region* r = region_of(p.key);
    if (!r) return "piece " + std::to_string(i) + " names key " + std::to_string(p.key) + ", which this agent never exported";
    if (p.remote_addr < r->base || p.remote_addr - r->base > r->size || p.nbytes > r->size - (p.remote_addr - r->base))
      return "piece " + std::to_string(i) + " (" + std::to_string(p.nbytes) + " bytes at " + std::to_string(p.remote_addr) +
             ") runs outside the region exported under key " + std::to_string(p.key);
  }
  if (total != data_len)
    return "pieces of " + std::to_string(total) + " bytes for " + std::to_string(data_len) + " bytes of data";
  return {};
}

}  // namespace ucx_data
}  // namespace kvxfer
