#include "core/layout.h"

#include "core/errors.h"
#include "core/imm.h"

namespace kvxfer {
namespace {

uint64_t fnv1a(uint64_t h, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

template <typename T>
void check_field(const char* name, const T& src, const T& dst) {
  KVXFER_CHECK(src == dst, LayoutMismatch,
               "layout mismatch: " << name << " is " << src << " on the sender but " << dst
                                   << " on the receiver; both sides must describe the same model shard "
                                      "(same block_size, dtype, KV heads, head_dim and layer count)");
}

}  // namespace

uint64_t LayoutSpec::fingerprint() const {
  uint64_t h = 0xcbf29ce484222325ull;
  const uint64_t fields[] = {num_layers, num_planes, block_size, num_kv_heads, head_dim, chunk_bytes};
  h = fnv1a(h, fields, sizeof(fields));
  return fnv1a(h, dtype.data(), dtype.size());
}

void validate_layout(const LayoutSpec& l, const std::vector<uint64_t>& region_nbytes) {
  KVXFER_CHECK(l.num_layers >= 1 && l.num_layers <= ImmCode::kMaxLayers, InvalidArgument,
               "num_layers=" << l.num_layers << " must be in 1.." << ImmCode::kMaxLayers
                             << " (the immediate carries an 8-bit layer index)");
  KVXFER_CHECK(l.num_blocks >= 1, InvalidArgument, "num_blocks must be >= 1");
  KVXFER_CHECK(l.num_planes == 1 || l.num_planes == 2, InvalidArgument,
               "num_planes=" << l.num_planes << " must be 1 (MLA / K and V together) or 2 (K and V planes)");
  KVXFER_CHECK(l.chunk_bytes >= 1, InvalidArgument, "chunk_bytes must be >= 1");
  KVXFER_CHECK(l.layer_region.size() == l.num_layers && l.layer_offset.size() == l.num_layers, InvalidArgument,
               "layout needs one (region, offset) per layer: got " << l.layer_region.size() << " regions and "
                                                                   << l.layer_offset.size() << " offsets for "
                                                                   << l.num_layers << " layers");
  KVXFER_CHECK(l.num_blocks == 1 || l.block_stride >= l.chunk_bytes, InvalidArgument,
               "block_stride=" << l.block_stride << " is smaller than chunk_bytes=" << l.chunk_bytes
                               << ": blocks would overlap");
  KVXFER_CHECK(l.num_planes == 1 || l.plane_stride >= l.chunk_bytes, InvalidArgument,
               "plane_stride=" << l.plane_stride << " is smaller than chunk_bytes=" << l.chunk_bytes
                               << ": K and V planes would overlap");
  for (uint32_t layer = 0; layer < l.num_layers; ++layer) {
    const uint32_t r = l.layer_region[layer];
    KVXFER_CHECK(r < region_nbytes.size(), InvalidArgument,
                 "layer " << layer << " refers to region " << r << " but the pool has " << region_nbytes.size());
    const uint64_t end = l.offset(layer, l.num_planes - 1, l.num_blocks - 1) + l.chunk_bytes;
    KVXFER_CHECK(end <= region_nbytes[r], PoolTooSmall,
                 "layer " << layer << " of a " << l.kind << " layout with " << l.num_blocks << " blocks needs "
                          << end << " bytes but its memory has " << region_nbytes[r]
                          << "; pass the tensor(s) the layout was built for, or lower num_blocks");
  }
}

void check_compatible(const LayoutSpec& src, const LayoutSpec& dst) {
  check_field("num_layers", src.num_layers, dst.num_layers);
  check_field("block_size", src.block_size, dst.block_size);
  check_field("dtype", src.dtype, dst.dtype);
  check_field("num_kv_heads", src.num_kv_heads, dst.num_kv_heads);
  check_field("head_dim", src.head_dim, dst.head_dim);
  check_field("num_planes (K/V split)", src.num_planes, dst.num_planes);
  check_field("chunk_bytes (bytes per block per plane)", src.chunk_bytes, dst.chunk_bytes);
}

}  // namespace kvxfer
