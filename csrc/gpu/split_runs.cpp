#include "gpu/split_runs.h"

#include <algorithm>

namespace kvxfer {
namespace gpu {

void split_for_blocks(const CopyRun* in, size_t n, uint32_t max_blocks, std::vector<CopyRun>* out) {
  uint64_t total = 0;
  for (size_t i = 0; i < n; ++i) total += in[i].nbytes;
  const uint64_t share = (total / std::max<uint32_t>(1, max_blocks) + kSplitGrain - 1) / kSplitGrain * kSplitGrain;
  const uint64_t piece = std::max(kSplitGrain, share);
  out->clear();
  out->reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (in[i].nbytes <= piece) {
      out->push_back(in[i]);
      continue;
    }
    for (uint64_t at = 0; at < in[i].nbytes; at += piece)
      out->push_back({in[i].dst + at, in[i].src + at, std::min(piece, in[i].nbytes - at)});
  }
}

}  // namespace gpu
}  // namespace kvxfer
