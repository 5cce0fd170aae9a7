#include "core/plan.h"

#include <algorithm>

#include "core/errors.h"
#include "core/imm.h"

namespace kvxfer {
namespace {

void check_ids(const char* side, const char* owner, const int32_t* ids, size_t n, uint32_t num_blocks,
               bool reject_duplicates) {
  std::vector<uint8_t> seen(reject_duplicates ? num_blocks : 0, 0);
  for (size_t i = 0; i < n; ++i) {
    const int32_t b = ids[i];
    KVXFER_CHECK(b >= 0 && static_cast<uint32_t>(b) < num_blocks, BlockOutOfRange,
                 side << " block id " << b << " (index " << i << ") is outside 0.." << num_blocks - 1 << ": "
                      << owner << " has " << num_blocks << " blocks; take ids from that pool's allocator");
    if (reject_duplicates) {
      KVXFER_CHECK(!seen[b], InvalidArgument,
                   side << " block id " << b << " appears twice (index " << i
                        << "); each destination block may be written once per transfer");
      seen[b] = 1;
    }
  }
}

void check_layer_range(const LayoutSpec& l, uint32_t first, uint32_t count) {
  KVXFER_CHECK(count >= 1 && first < l.num_layers && count <= l.num_layers - first, InvalidArgument,
               "layer range [" << first << ", " << first + count << ") is outside the layout's " << l.num_layers
                               << " layers");
}

}  // namespace

size_t gather_run(const WritePlan& plan, uint32_t i, uint32_t end, size_t max_iov, uint32_t* granules) {
  size_t n = 0;
  uint32_t sum = 0;
  while (n < max_iov && i + n < end && sum + plan.shape(i + n).granules <= ImmCode::kMaxGranules)
    sum += plan.shape(i + n++).granules;
  *granules = sum;
  return n;
}

size_t staged_run(const WritePlan& plan, uint32_t i, uint32_t end, uint64_t slot_bytes, size_t max_pieces,
                  uint32_t* granules, bool merge_dst) {
  size_t n = 0, pieces = 0;
  uint32_t sum = 0;
  uint64_t bytes = 0;
  while (i + n < end) {
    const Write& w = plan.shape(i + n);
    // Shapes are relative to the layer's bases and a batch stays in one layer, so following shapes follow on the wire.
    const Write* prev = n > 0 ? &plan.shape(i + n - 1) : nullptr;
    const bool joins = merge_dst && prev && prev->dst_offset + prev->nbytes == w.dst_offset;
    if ((!joins && pieces == max_pieces) || sum + w.granules > ImmCode::kMaxGranules || bytes + w.nbytes > slot_bytes)
      break;
    pieces += !joins;
    sum += w.granules;
    bytes += w.nbytes;
    ++n;
  }
  *granules = sum;
  return n;
}

uint32_t expected_granules(const LayoutSpec& dst, const int32_t* dst_ids, size_t n, size_t pieces_per_chunk) {
  KVXFER_CHECK(n >= 1, InvalidArgument, "a transfer needs at least one destination block");
  check_ids("destination", "the receiving pool", dst_ids, n, dst.num_blocks, true);
  const uint64_t g = static_cast<uint64_t>(n) * dst.num_planes * pieces_per_chunk;
  KVXFER_CHECK(g <= UINT32_MAX, InvalidArgument, "too many blocks in one transfer: " << n);
  return static_cast<uint32_t>(g);
}

std::vector<ChunkPiece> chunk_pieces(const LayoutSpec& src, const LayoutSpec& dst) {
  if (src.same_heads(dst)) return {ChunkPiece{0, 0, src.chunk_bytes}};
  const uint32_t h0 = std::max(src.head_begin, dst.head_begin), h1 = std::min(src.head_end(), dst.head_end());
  const uint64_t row = src.row_bytes();
  auto at = [](const LayoutSpec& l, uint32_t token, uint32_t head) -> uint64_t {  // row index inside a chunk
    const uint32_t h = head - l.head_begin;
    return l.head_major ? static_cast<uint64_t>(h) * l.block_size + token
                        : static_cast<uint64_t>(token) * l.num_kv_heads + h;
  };
  std::vector<ChunkPiece> pieces;
  auto add = [&](uint32_t token, uint32_t head) {
    const uint64_t so = at(src, token, head) * row, d_o = at(dst, token, head) * row;
    if (!pieces.empty()) {
      ChunkPiece& p = pieces.back();
      if (p.src_offset + p.nbytes == so && p.dst_offset + p.nbytes == d_o) {
        p.nbytes += row;
        return;
      }
    }
    pieces.push_back(ChunkPiece{so, d_o, row});
  };
  // Rows in the source's order, so each piece reads forward.
  if (src.head_major) {
    for (uint32_t h = h0; h < h1; ++h)
      for (uint32_t t = 0; t < src.block_size; ++t) add(t, h);
  } else {
    for (uint32_t t = 0; t < src.block_size; ++t)
      for (uint32_t h = h0; h < h1; ++h) add(t, h);
  }
  return pieces;
}

WritePlan build_plan(const LayoutSpec& src, const LayoutSpec& dst, const int32_t* src_ids, const int32_t* dst_ids,
                     size_t n, uint32_t first_layer, uint32_t num_layers, uint64_t max_write_bytes) {
  check_compatible(src, dst);
  check_layer_range(src, first_layer, num_layers);
  check_ids("source", "the local pool", src_ids, n, src.num_blocks, false);
  const std::vector<ChunkPiece> pieces = chunk_pieces(src, dst);
  const uint32_t granules = expected_granules(dst, dst_ids, n, pieces.size());
  // Writes are indexed by 32-bit positions across the transfer's layers.
  KVXFER_CHECK(static_cast<uint64_t>(granules) * num_layers <= UINT32_MAX, InvalidArgument,
               "too many chunks in one transfer: " << granules << " per layer x " << num_layers
                                                   << " layers; split the request into several transfers");
  uint64_t piece_bytes = 0, largest = 0;  // of one chunk's pieces
  for (const ChunkPiece& p : pieces) piece_bytes += p.nbytes, largest = std::max(largest, p.nbytes);
  KVXFER_CHECK(max_write_bytes >= largest, InvalidArgument,
               "max_write_bytes=" << max_write_bytes << " is below one chunk (" << largest << " bytes)");

  WritePlan plan;
  plan.first_layer = first_layer;
  plan.num_layers = num_layers;
  plan.num_blocks = static_cast<uint32_t>(n);
  plan.granules_per_layer = granules;
  plan.bytes_per_layer = static_cast<uint64_t>(n) * src.num_planes * piece_bytes;
  plan.layers.reserve(num_layers);
  for (uint32_t li = 0; li < num_layers; ++li) {
    const uint32_t layer = first_layer + li;
    plan.layers.push_back(LayerBase{src.layer_offset[layer], dst.layer_offset[layer], src.layer_region[layer],
                                    dst.layer_region[layer]});
  }
  // Random block ids (the common case) rarely coalesce: reserve every chunk of the layer up front.
  plan.layer_writes.reserve(granules);
  const bool planes_inner = dst.num_planes == 1 || dst.plane_stride < dst.block_stride;
  const uint32_t P = src.num_planes;
  Write* cur = nullptr;
  auto add = [&](uint32_t plane, size_t i) {
    // Relative to the layer's base (LayoutSpec::offset without layer_offset).
    const uint64_t sc = plane * src.plane_stride + static_cast<uint64_t>(src_ids[i]) * src.block_stride;
    const uint64_t dc = plane * dst.plane_stride + static_cast<uint64_t>(dst_ids[i]) * dst.block_stride;
    for (const ChunkPiece& p : pieces) {
      const uint64_t so = sc + p.src_offset, d_o = dc + p.dst_offset;
      if (cur && cur->src_offset + cur->nbytes == so && cur->dst_offset + cur->nbytes == d_o &&
          cur->granules < ImmCode::kMaxGranules && cur->nbytes + p.nbytes <= max_write_bytes) {
        cur->nbytes += p.nbytes;
        cur->granules += 1;
        continue;
      }
      plan.layer_writes.push_back(Write{so, d_o, p.nbytes, 0, 0, 0, 1});
      cur = &plan.layer_writes.back();
    }
  };
  if (planes_inner) {
    for (size_t i = 0; i < n; ++i)
      for (uint32_t p = 0; p < P; ++p) add(p, i);
  } else {
    for (uint32_t p = 0; p < P; ++p)
      for (size_t i = 0; i < n; ++i) add(p, i);
  }
  return plan;
}

}  // namespace kvxfer
