// How a batch of copies is laid out over the gather kernels' blocks (csrc/cuda/gather_copy.cu): which descriptors
// (split_for_blocks) and, for the batched layer kernel, how many layers a block copies between two fences.
//
// Plain C++ (no CUDA): the descriptors are the kernels' own layout, and these choices are host logic that tests
// check on machines without a GPU (tests/test_gather_batch.py).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvxfer {
namespace gpu {

struct CopyRun {
  uint64_t dst, src, nbytes;  // the layout of cuda::CopyDesc (static_assert in cuda_device.cpp)
};

// Pieces never go below this size and are multiples of it, so they keep the run's alignment (16-byte vectors).
constexpr uint64_t kSplitGrain = uint64_t(64) << 10;

// A batch of a few long runs (contiguous block ids coalesced) would copy on a few SMs while the rest idle. Runs
// longer than an even share of the batch over max_blocks blocks (at least kSplitGrain, rounded up to a multiple of
// it) are cut into pieces of that share, in order; batches of many small chunks, the usual KV request, stay as they
// are. `out` is cleared first.
void split_for_blocks(const CopyRun* in, size_t n, uint32_t max_blocks, std::vector<CopyRun>* out);

// How many layers a block of the batched gather kernel copies between two fences: enough that each block copies
// about fence_bytes of one layer's `pieces` (as cut above, spread over min(pieces, max_blocks) blocks) before it
// drains, at least 1, at most num_layers; 1 when fence_bytes is 0.
uint32_t layers_per_fence(const std::vector<CopyRun>& pieces, uint32_t max_blocks, uint64_t fence_bytes,
                          size_t num_layers);

}  // namespace gpu
}  // namespace kvxfer
