// split_for_blocks: cuts long copies so a gather kernel that gives each descriptor one block keeps every SM busy.
//
// Plain C++ (no CUDA): the descriptors are the kernels' own layout, and the cut is host logic that tests check on
// machines without a GPU (tests/test_split_runs.py).
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

}  // namespace gpu
}  // namespace kvxfer
