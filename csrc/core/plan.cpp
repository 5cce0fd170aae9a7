#include "core/plan.h"

#include <algorithm>
#include <deque>

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

namespace {

void check_dst_ids(const LayoutSpec& dst, const int32_t* dst_ids, size_t n) {
  KVXFER_CHECK(n >= 1, InvalidArgument, "a transfer needs at least one destination block");
  check_ids("destination", "the receiving pool", dst_ids, n, dst.num_blocks, true);
}

// chunk_pieces per distinct (src_row, dst_row, tokens) of a request's runs: with unequal block sizes the runs come
// in a few shapes that repeat block after block.
class PieceCache {
 public:
  // by_rows: each piece counts its rows (a request of num_tokens), split to at most kMaxGranules rows a piece.
  PieceCache(const LayoutSpec& src, const LayoutSpec& dst, bool by_rows) : src_(src), dst_(dst), by_rows_(by_rows) {}
  const std::vector<ChunkPiece>& get(const TokenRun& r) {
    for (const auto& [key, pieces] : cache_)
      if (key.src_row == r.src_row && key.dst_row == r.dst_row && key.tokens == r.tokens) return pieces;
    std::vector<ChunkPiece> pieces = chunk_pieces(src_, dst_, r.src_row, r.dst_row, r.tokens);
    cache_.emplace_back(r, by_rows_ ? by_rows(pieces) : std::move(pieces));
    return cache_.back().second;
  }

 private:
  std::vector<ChunkPiece> by_rows(const std::vector<ChunkPiece>& pieces) const {
    const uint64_t row = src_.row_bytes(), most = uint64_t(ImmCode::kMaxGranules) * row;
    std::vector<ChunkPiece> out;
    for (const ChunkPiece& p : pieces)
      for (uint64_t at = 0; at < p.nbytes; at += most) {
        const uint64_t n = std::min(most, p.nbytes - at);
        out.push_back(ChunkPiece{p.src_offset + at, p.dst_offset + at, n, static_cast<uint32_t>(n / row)});
      }
    return out;
  }
  const LayoutSpec &src_, &dst_;
  const bool by_rows_;
  std::deque<std::pair<TokenRun, std::vector<ChunkPiece>>> cache_;  // deque: references stay valid
};

// Pools of different block sizes (or a count of tokens) need num_tokens on both sides.
void require_num_tokens(const LayoutSpec& src, const LayoutSpec& dst, uint32_t num_tokens) {
  KVXFER_CHECK(num_tokens > 0, InvalidArgument,
               "the pools' blocks hold " << src.block_size << " and " << dst.block_size
                                         << " tokens: pass num_tokens (the request's tokens) to send() and recv()");
}

uint64_t blocks_for(uint32_t tokens, uint32_t block_size) { return (uint64_t(tokens) + block_size - 1) / block_size; }

// Runs of a whole-block transfer with equal block sizes: block i into block i, whole (the common case, no cutting).
// A pool whose tokens are not rows (vLLM CPU's transposed K) moves a request's partial last block whole too: its
// first tokens' bytes are not one range, and the bytes past them are the request's own block's unused tail.
bool whole_blocks(const LayoutSpec& src, const LayoutSpec& dst, uint32_t num_tokens) {
  return src.block_size == dst.block_size && (num_tokens == 0 || !src.token_rows() || !dst.token_rows());
}

// With num_tokens in whole-block mode, the ids must still be the blocks those tokens fill.
void check_whole_block_count(const char* which, size_t n, uint32_t num_tokens, uint32_t block_size) {
  if (num_tokens == 0) return;
  const uint64_t blocks = blocks_for(num_tokens, block_size);
  KVXFER_CHECK(n == blocks, InvalidArgument,
               num_tokens << " tokens fill " << blocks << " blocks of " << block_size << " tokens, but " << which
                          << " has " << n);
}

}  // namespace

std::vector<TokenRun> token_runs(uint32_t bs, uint32_t bd, uint32_t num_tokens) {
  std::vector<TokenRun> runs;
  for (uint32_t t = 0; t < num_tokens;) {
    const uint32_t rs = t % bs, rd = t % bd;
    const uint32_t n = std::min({bs - rs, bd - rd, num_tokens - t});
    runs.push_back(TokenRun{t / bs, rs, t / bd, rd, n});
    t += n;
  }
  return runs;
}

uint32_t transfer_tokens(const LayoutSpec& src, const LayoutSpec& dst, size_t n_src, size_t n_dst,
                         uint32_t num_tokens) {
  if (whole_blocks(src, dst, num_tokens)) {
    KVXFER_CHECK(n_src == n_dst, InvalidArgument,
                 "src_ids has " << n_src << " block ids but dst_ids has " << n_dst
                                << "; pass one destination per source");
    check_whole_block_count("src_ids", n_src, num_tokens, src.block_size);
    return static_cast<uint32_t>(std::min<uint64_t>(n_src * uint64_t(src.block_size), UINT32_MAX));
  }
  require_num_tokens(src, dst, num_tokens);
  auto blocks = [&](uint32_t bs) { return blocks_for(num_tokens, bs); };
  KVXFER_CHECK(n_src == blocks(src.block_size) && n_dst == blocks(dst.block_size), InvalidArgument,
               num_tokens << " tokens fill " << blocks(src.block_size) << " source blocks of " << src.block_size
                          << " tokens and " << blocks(dst.block_size) << " destination blocks of " << dst.block_size
                          << ", but src_ids has " << n_src << " and dst_ids " << n_dst);
  return num_tokens;
}

uint32_t expected_granules(const LayoutSpec& src, const LayoutSpec& dst, const int32_t* dst_ids, size_t n,
                           uint32_t num_tokens) {
  check_dst_ids(dst, dst_ids, n);
  uint64_t g = 0;
  if (whole_blocks(src, dst, num_tokens)) {
    check_whole_block_count("dst_ids", n, num_tokens, dst.block_size);
    g = static_cast<uint64_t>(n) * dst.num_planes * chunk_pieces(src, dst).size();
  } else {
    require_num_tokens(src, dst, num_tokens);
    const uint64_t blocks = blocks_for(num_tokens, dst.block_size);
    KVXFER_CHECK(n == blocks, InvalidArgument,
                 num_tokens << " tokens fill " << blocks << " destination blocks of " << dst.block_size
                            << " tokens, but dst_ids has " << n);
    PieceCache cache(src, dst, true);
    for (const TokenRun& r : token_runs(src.block_size, dst.block_size, num_tokens))
      for (const ChunkPiece& p : cache.get(r)) g += static_cast<uint64_t>(dst.num_planes) * p.granules;
  }
  KVXFER_CHECK(g <= UINT32_MAX, InvalidArgument, "too many blocks in one transfer: " << n);
  return static_cast<uint32_t>(g);
}

std::vector<ChunkPiece> chunk_pieces(const LayoutSpec& src, const LayoutSpec& dst, uint32_t src_row,
                                     uint32_t dst_row, uint32_t tokens) {
  const bool whole = tokens == 0 || (src_row == 0 && dst_row == 0 && tokens == src.block_size &&
                                     src.block_size == dst.block_size);
  if (whole && src.same_heads(dst)) return {ChunkPiece{0, 0, src.chunk_bytes}};
  if (tokens == 0) tokens = src.block_size;
  // A latent cache (MLA) has no heads: one row per token.
  auto heads = [](const LayoutSpec& l) { return std::max<uint32_t>(1, l.num_kv_heads); };
  const uint32_t h0 = std::max(src.head_begin, dst.head_begin);
  const uint32_t h1 = std::min(src.head_begin + heads(src), dst.head_begin + heads(dst));
  const uint64_t row = src.row_bytes();
  auto at = [&](const LayoutSpec& l, uint32_t token, uint32_t head) -> uint64_t {  // row index inside a chunk
    const uint32_t h = head - l.head_begin;
    return l.head_major ? static_cast<uint64_t>(h) * l.block_size + token : static_cast<uint64_t>(token) * heads(l) + h;
  };
  std::vector<ChunkPiece> pieces;
  auto add = [&](uint32_t t, uint32_t head) {
    const uint64_t so = at(src, src_row + t, head) * row, d_o = at(dst, dst_row + t, head) * row;
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
      for (uint32_t t = 0; t < tokens; ++t) add(t, h);
  } else {
    for (uint32_t t = 0; t < tokens; ++t)
      for (uint32_t h = h0; h < h1; ++h) add(t, h);
  }
  return pieces;
}

WritePlan build_plan(const LayoutSpec& src, const LayoutSpec& dst, const int32_t* src_ids, size_t n_src,
                     const int32_t* dst_ids, size_t n_dst, uint32_t num_tokens, uint32_t first_layer,
                     uint32_t num_layers, uint64_t max_write_bytes) {
  check_compatible(src, dst);
  check_layer_range(src, first_layer, num_layers);
  const uint32_t tokens = transfer_tokens(src, dst, n_src, n_dst, num_tokens);
  check_ids("source", "the local pool", src_ids, n_src, src.num_blocks, false);
  const uint32_t granules = expected_granules(src, dst, dst_ids, n_dst, num_tokens);
  // Writes are indexed by 32-bit positions across the transfer's layers.
  KVXFER_CHECK(static_cast<uint64_t>(granules) * num_layers <= UINT32_MAX, InvalidArgument,
               "too many chunks in one transfer: " << granules << " per layer x " << num_layers
                                                   << " layers; split the request into several transfers");
  // Block i into block i (whole blocks, equal sizes), or the runs of the request's tokens.
  std::vector<TokenRun> runs;
  if (whole_blocks(src, dst, num_tokens)) {
    runs.reserve(n_src);
    for (uint32_t i = 0; i < n_src; ++i) runs.push_back(TokenRun{i, 0, i, 0, 0});
  } else {
    runs = token_runs(src.block_size, dst.block_size, tokens);
  }
  PieceCache cache(src, dst, !whole_blocks(src, dst, num_tokens));
  uint64_t bytes = 0, largest = 0, pieces = 0;
  for (const TokenRun& r : runs)
    for (const ChunkPiece& p : cache.get(r)) bytes += p.nbytes, largest = std::max(largest, p.nbytes), ++pieces;
  KVXFER_CHECK(max_write_bytes >= largest, InvalidArgument,
               "max_write_bytes=" << max_write_bytes << " is below one chunk (" << largest << " bytes)");

  WritePlan plan;
  plan.first_layer = first_layer;
  plan.num_layers = num_layers;
  plan.num_blocks = static_cast<uint32_t>(n_dst);
  plan.granules_per_layer = granules;
  plan.bytes_per_layer = bytes * src.num_planes;
  plan.layers.reserve(num_layers);
  for (uint32_t li = 0; li < num_layers; ++li) {
    const uint32_t layer = first_layer + li;
    plan.layers.push_back(LayerBase{src.layer_offset[layer], dst.layer_offset[layer], src.layer_region[layer],
                                    dst.layer_region[layer]});
  }
  // Random block ids (the common case) rarely coalesce: reserve every piece of the layer up front (no write moves
  // while `cur` points at it).
  plan.layer_writes.reserve(pieces * src.num_planes);
  const bool planes_inner = dst.num_planes == 1 || dst.plane_stride < dst.block_stride;
  const uint32_t P = src.num_planes;
  Write* cur = nullptr;
  auto add = [&](uint32_t plane, const TokenRun& r) {
    // Relative to the layer's base (LayoutSpec::offset without layer_offset).
    const uint64_t sc = plane * src.plane_stride + static_cast<uint64_t>(src_ids[r.src_index]) * src.block_stride;
    const uint64_t dc = plane * dst.plane_stride + static_cast<uint64_t>(dst_ids[r.dst_index]) * dst.block_stride;
    for (const ChunkPiece& p : cache.get(r)) {
      const uint64_t so = sc + p.src_offset, d_o = dc + p.dst_offset;
      if (cur && cur->src_offset + cur->nbytes == so && cur->dst_offset + cur->nbytes == d_o &&
          cur->granules + p.granules <= ImmCode::kMaxGranules && cur->nbytes + p.nbytes <= max_write_bytes) {
        cur->nbytes += p.nbytes;
        cur->granules += p.granules;
        continue;
      }
      plan.layer_writes.push_back(Write{so, d_o, p.nbytes, 0, 0, 0, p.granules});
      cur = &plan.layer_writes.back();
    }
  };
  if (planes_inner) {
    for (const TokenRun& r : runs)
      for (uint32_t p = 0; p < P; ++p) add(p, r);
  } else {
    for (uint32_t p = 0; p < P; ++p)
      for (const TokenRun& r : runs) add(p, r);
  }
  return plan;
}

}  // namespace kvxfer
