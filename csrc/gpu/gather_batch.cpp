#include "gpu/gather_batch.h"

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

uint32_t layers_per_fence(const std::vector<CopyRun>& pieces, uint32_t max_blocks, uint64_t fence_bytes,
                          size_t num_layers) {
  if (fence_bytes == 0 || pieces.empty() || num_layers <= 1) return 1;
  uint64_t layer_bytes = 0;
  for (const CopyRun& r : pieces) layer_bytes += r.nbytes;
  const uint64_t blocks = std::max<uint64_t>(1, std::min<uint64_t>(pieces.size(), max_blocks));
  const uint64_t per_block = std::max<uint64_t>(1, layer_bytes / blocks);
  const uint64_t layers = (fence_bytes + per_block - 1) / per_block;
  return static_cast<uint32_t>(std::clamp<uint64_t>(layers, 1, num_layers));
}

}  // namespace gpu
}  // namespace kvxfer
