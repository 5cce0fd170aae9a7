#include "core/plan.h"

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
                  uint32_t* granules) {
  size_t n = 0;
  uint32_t sum = 0;
  uint64_t bytes = 0;
  while (n < max_pieces && i + n < end) {
    const Write& w = plan.shape(i + n);
    if (sum + w.granules > ImmCode::kMaxGranules || bytes + w.nbytes > slot_bytes) break;
    sum += w.granules;
    bytes += w.nbytes;
    ++n;
  }
  *granules = sum;
  return n;
}

uint32_t expected_granules(const LayoutSpec& dst, const int32_t* dst_ids, size_t n) {
  KVXFER_CHECK(n >= 1, InvalidArgument, "a transfer needs at least one destination block");
  check_ids("destination", "the receiving pool", dst_ids, n, dst.num_blocks, true);
  const uint64_t g = static_cast<uint64_t>(n) * dst.num_planes;
  KVXFER_CHECK(g <= UINT32_MAX, InvalidArgument, "too many blocks in one transfer: " << n);
  return static_cast<uint32_t>(g);
}

WritePlan build_plan(const LayoutSpec& src, const LayoutSpec& dst, const int32_t* src_ids, const int32_t* dst_ids,
                     size_t n, uint32_t first_layer, uint32_t num_layers, uint64_t max_write_bytes) {
  check_compatible(src, dst);
  check_layer_range(src, first_layer, num_layers);
  check_ids("source", "the local pool", src_ids, n, src.num_blocks, false);
  const uint32_t granules = expected_granules(dst, dst_ids, n);
  // Writes are indexed by 32-bit positions across the transfer's layers.
  KVXFER_CHECK(static_cast<uint64_t>(granules) * num_layers <= UINT32_MAX, InvalidArgument,
               "too many chunks in one transfer: " << granules << " per layer x " << num_layers
                                                   << " layers; split the request into several transfers");
  KVXFER_CHECK(max_write_bytes >= src.chunk_bytes, InvalidArgument,
               "max_write_bytes=" << max_write_bytes << " is below one chunk (" << src.chunk_bytes << " bytes)");

  WritePlan plan;
  plan.first_layer = first_layer;
  plan.num_layers = num_layers;
  plan.num_blocks = static_cast<uint32_t>(n);
  plan.granules_per_layer = granules;
  plan.bytes_per_layer = static_cast<uint64_t>(granules) * src.chunk_bytes;
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
  const uint64_t chunk = src.chunk_bytes;
  Write* cur = nullptr;
  auto add = [&](uint32_t plane, size_t i) {
    // Relative to the layer's base (LayoutSpec::offset without layer_offset).
    const uint64_t so = plane * src.plane_stride + static_cast<uint64_t>(src_ids[i]) * src.block_stride;
    const uint64_t d_o = plane * dst.plane_stride + static_cast<uint64_t>(dst_ids[i]) * dst.block_stride;
    if (cur && cur->src_offset + cur->nbytes == so && cur->dst_offset + cur->nbytes == d_o &&
        cur->granules < ImmCode::kMaxGranules && cur->nbytes + chunk <= max_write_bytes) {
      cur->nbytes += chunk;
      cur->granules += 1;
      return;
    }
    plan.layer_writes.push_back(Write{so, d_o, chunk, 0, 0, 0, 1});
    cur = &plan.layer_writes.back();
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
