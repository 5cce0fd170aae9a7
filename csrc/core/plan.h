// WritePlan: block ids x layers expanded into merged writes, sliced per layer. Built in C++ only.
//
// Chunks are visited block by block in the caller's order (planes inner when the destination keeps a block's
// planes closer together than consecutive blocks, planes outer otherwise) and a chunk is merged into the previous
// write when it follows it on both sides in the same regions. A write never spans layers (its immediate names one
// layer), never exceeds ImmCode::kMaxGranules chunks and never exceeds max_write_bytes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/layout.h"

namespace kvxfer {

struct Write {
  uint64_t src_offset;  // byte offset into source region src_region
  uint64_t dst_offset;  // byte offset into destination region dst_region
  uint64_t nbytes;
  uint32_t src_region;
  uint32_t dst_region;
  uint32_t layer;
  uint32_t granules;    // chunks carried, for the immediate
};

struct WritePlan {
  uint32_t first_layer = 0;
  uint32_t num_layers = 0;
  uint32_t num_blocks = 0;
  uint32_t granules_per_layer = 0;     // num_blocks * num_planes: what the receiver counts per layer
  uint64_t bytes_per_layer = 0;
  std::vector<Write> writes;           // all writes, grouped by layer
  std::vector<uint32_t> layer_begin;   // [num_layers + 1]: writes of layer first_layer+i are [begin[i], begin[i+1])

  uint64_t total_bytes() const { return bytes_per_layer * num_layers; }
};

// Validates the ids (in range on their side, same count, no duplicate destination) and the layer range, then
// expands. Throws BlockOutOfRange / InvalidArgument / LayoutMismatch before producing anything.
WritePlan build_plan(const LayoutSpec& src, const LayoutSpec& dst, const int32_t* src_ids, const int32_t* dst_ids,
                     size_t num_ids, uint32_t first_layer, uint32_t num_layers, uint64_t max_write_bytes);

// How many writes starting at index i (and before end, within one layer) one gathered write takes: at most
// max_iov, and never more than ImmCode::kMaxGranules granules together (*granules receives their sum). The agent
// posts with this rule and counts its expected completions with it, so the two can never disagree.
size_t gather_run(const WritePlan& plan, uint32_t i, uint32_t end, size_t max_iov, uint32_t* granules);

// How many writes starting at i one staging slot takes: their bytes fit in slot_bytes, at most max_pieces of them
// and at most ImmCode::kMaxGranules granules together (*granules receives the sum). Posting through the staging
// ring and counting a staged send's expected completions both use this rule.
size_t staged_run(const WritePlan& plan, uint32_t i, uint32_t end, uint64_t slot_bytes, size_t max_pieces,
                  uint32_t* granules);

// The receiver's expectation for one layer of dst_ids: granules it must count. Validates dst ids as above.
uint32_t expected_granules(const LayoutSpec& dst, const int32_t* dst_ids, size_t num_ids);

}  // namespace kvxfer
