#include "core/layout.h"

#include <algorithm>

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

// The head range fits the model's heads, and a pool whose heads can be sliced cuts into whole rows.
void check_heads(const LayoutSpec& l) {
  if (l.num_kv_heads == 0) {
    KVXFER_CHECK(l.head_begin == 0 && l.total_kv_heads == 0 && !l.head_major, InvalidArgument,
                 "a layout without KV heads (MLA latents) cannot hold a head range: every TP rank holds the whole "
                 "latent, so send it from one rank");
    return;
  }
  KVXFER_CHECK(l.total_kv_heads == 0 || l.head_end() <= l.total_kv_heads, InvalidArgument,
               "KV heads [" << l.head_begin << ", " << l.head_end() << ") are outside the model's "
                            << l.total_kv_heads << " (total_kv_heads)");
  KVXFER_CHECK(l.total_kv_heads != 0 || l.head_begin == 0, InvalidArgument,
               "head_begin=" << l.head_begin << " needs total_kv_heads (the model's KV heads) as well");
  KVXFER_CHECK(l.block_size >= 1 && l.chunk_bytes % (static_cast<uint64_t>(l.block_size) * l.num_kv_heads) == 0,
               InvalidArgument,
               "chunk_bytes=" << l.chunk_bytes << " is not block_size x num_kv_heads (" << l.block_size << " x "
                              << l.num_kv_heads << ") rows of equal size");
}

}  // namespace

uint64_t LayoutSpec::fingerprint() const {
  uint64_t h = 0xcbf29ce484222325ull;
  const uint64_t fields[] = {num_layers, num_planes,    block_size,         num_kv_heads, head_dim,
                             chunk_bytes, head_begin, total_heads(), uint64_t(head_major)};
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
  check_heads(l);
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
  check_field("dtype", src.dtype, dst.dtype);
  check_field("head_dim", src.head_dim, dst.head_dim);
  check_field("num_planes (K/V split)", src.num_planes, dst.num_planes);
  const bool sharded = src.total_kv_heads || dst.total_kv_heads;
  if (!sharded || src.num_kv_heads == 0 || dst.num_kv_heads == 0) {
    KVXFER_CHECK(src.num_kv_heads == dst.num_kv_heads, LayoutMismatch,
                 "layout mismatch: num_kv_heads is " << src.num_kv_heads << " on the sender but " << dst.num_kv_heads
                 << " on the receiver; pools of different tensor-parallel ranks must say which heads they hold "
                    "(KVLayout.with_heads(head_begin, total_kv_heads)), others must describe the same model shard");
  }
  check_field("total_kv_heads (the model's KV heads)", src.total_heads(), dst.total_heads());
  if (src.same_heads(dst) && src.block_size == dst.block_size) {
    check_field("chunk_bytes (bytes per block per plane)", src.chunk_bytes, dst.chunk_bytes);
    return;
  }
  check_field("row bytes (one head of one token)", src.row_bytes(), dst.row_bytes());
  KVXFER_CHECK(src.block_size == dst.block_size || (src.token_rows() && dst.token_rows()), LayoutMismatch,
               "layout mismatch: blocks of " << src.block_size << " tokens on the sender and " << dst.block_size
               << " on the receiver, but a " << (src.token_rows() ? dst.kind : src.kind)
               << " pool does not store a token's K contiguously (vLLM's CPU backend keeps K transposed per block), "
                  "so tokens cannot move between blocks of different sizes; run both engines with one block size");
  if (src.num_kv_heads == 0) return;  // latents: blocks of different sizes, one row per token
  KVXFER_CHECK(std::max(src.head_begin, dst.head_begin) < std::min(src.head_end(), dst.head_end()), LayoutMismatch,
               "layout mismatch: the sender's pool holds KV heads [" << src.head_begin << ", " << src.head_end()
               << ") and the receiver's [" << dst.head_begin << ", " << dst.head_end()
               << "): no head in common; pair each rank with the ranks that hold its heads");
}

bool can_exchange(const LayoutSpec& src, const LayoutSpec& dst) {
  try {
    check_compatible(src, dst);
  } catch (const Error&) {
    return false;
  }
  return true;
}

}  // namespace kvxfer
