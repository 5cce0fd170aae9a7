// WritePlan: block ids x layers as merged writes, sliced per layer. Built in C++ only.
//
// A chunk moves whole when both pools hold the same KV heads in the same order in blocks of the same size; between
// pools of different tensor-parallel ranks (or token- vs head-major chunks) it moves as the pieces chunk_pieces
// finds, and between pools of different block sizes the request's tokens move as runs (token_runs), each cut into
// pieces. A piece counts as one granule, so both sides still derive the count from the two layouts alone.
//
// Chunks (runs) are visited block by block in the caller's order (planes inner when the destination keeps a
// block's planes closer together than consecutive blocks, planes outer otherwise) and a piece is merged into the
// previous write when it follows it on both sides in the same regions. A write never spans layers (its immediate names one
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

struct LayerBase {
  uint64_t src_offset;  // byte offset of the layer's (plane 0, block 0) in its source region
  uint64_t dst_offset;
  uint32_t src_region;
  uint32_t dst_region;
};

// Every layer of a transfer moves the same blocks, and a chunk's offset is the layer's base plus a part that does
// not depend on the layer (layout.h), so merging comes out the same in every layer: the plan keeps one layer's
// writes (offsets relative to the layer's base) and each layer's base, and yields write i on demand. A 32-layer
// request thus costs one layer's planning, not 32.
struct WritePlan {
  uint32_t first_layer = 0;
  uint32_t num_layers = 0;
  uint32_t num_blocks = 0;             // destination blocks
  uint32_t granules_per_layer = 0;     // pieces per layer (num_blocks * num_planes when chunks move whole): what
                                       // the receiver counts per layer
  uint64_t bytes_per_layer = 0;
  std::vector<Write> layer_writes;     // one layer's writes, offsets relative to the layer's bases, layer 0
  std::vector<LayerBase> layers;       // [num_layers]: where layer first_layer+i starts on both sides

  uint64_t total_bytes() const { return bytes_per_layer * num_layers; }
  uint32_t writes_per_layer() const { return static_cast<uint32_t>(layer_writes.size()); }
  uint64_t num_writes() const { return static_cast<uint64_t>(layer_writes.size()) * num_layers; }
  // Writes of layer first_layer+li are [layer_begin(li), layer_begin(li + 1)).
  uint32_t layer_begin(uint32_t li) const { return li * writes_per_layer(); }
  // Size and granules of write i (the same in every layer), without building it.
  const Write& shape(uint32_t i) const { return layer_writes[i % layer_writes.size()]; }
  // Write i, with absolute offsets, regions and layer.
  Write write(uint32_t i) const {
    const uint32_t li = i / writes_per_layer();
    const Write& t = layer_writes[i - li * writes_per_layer()];
    const LayerBase& b = layers[li];
    return Write{b.src_offset + t.src_offset, b.dst_offset + t.dst_offset, t.nbytes, b.src_region, b.dst_region,
                 first_layer + li, t.granules};
  }
};

// Where the bytes of one source chunk land in one destination chunk: the rows (one head of one token) of the heads
// both pools hold, merged where consecutive on both sides, offsets relative to the chunks' starts. One piece of the
// whole chunk when the pools hold the same heads in the same order; one per token when token-major pools hold
// different heads; one per chunk when head-major pools do (their heads are contiguous); one per row when one pool
// is token-major and the other head-major. check_compatible first.
// With src_row / dst_row / tokens, only those tokens: tokens [src_row, src_row + tokens) of the source chunk land
// from row dst_row of the destination chunk (pools of different block sizes; tokens 0: the whole block).
struct ChunkPiece {
  uint64_t src_offset, dst_offset, nbytes;
  uint32_t granules = 1;  // what its immediate counts: 1, or its rows when the request's tokens are counted (below)
};
std::vector<ChunkPiece> chunk_pieces(const LayoutSpec& src, const LayoutSpec& dst, uint32_t src_row = 0,
                                     uint32_t dst_row = 0, uint32_t tokens = 0);

// A request's tokens move from the sender's blocks into the receiver's in order: token t sits in src_ids[t / Bs]
// at row t % Bs and lands in dst_ids[t / Bd] at row t % Bd. With equal block sizes and every token of the blocks
// (num_tokens 0) that is block i into block i; with different ones (a prefill block of 16 tokens, a decode block of
// 32) a block lands in part of one, or across several. A run is a stretch of tokens inside one block on each side.
// Then a piece counts one granule per row it carries, so sides that disagree on num_tokens disagree on the count
// (BEGIN compares them) instead of completing with rows never written. A pool without token rows (vLLM CPU)
// moves whole blocks even with num_tokens (equal block sizes only; check_compatible refuses different ones).
struct TokenRun {
  uint32_t src_index, src_row, dst_index, dst_row, tokens;  // src_index / dst_index: positions in src_ids / dst_ids
};
std::vector<TokenRun> token_runs(uint32_t src_block_size, uint32_t dst_block_size, uint32_t num_tokens);

// The tokens a transfer moves, checking the id counts against them: num_tokens, or (0) every token of the blocks,
// which needs equal block sizes. Throws InvalidArgument naming the counts and the fix.
uint32_t transfer_tokens(const LayoutSpec& src, const LayoutSpec& dst, size_t n_src, size_t n_dst,
                         uint32_t num_tokens);

// Validates the ids (in range on their side, same count, no duplicate destination) and the layer range, then
// expands. Throws BlockOutOfRange / InvalidArgument / LayoutMismatch before producing anything.
WritePlan build_plan(const LayoutSpec& src, const LayoutSpec& dst, const int32_t* src_ids, size_t n_src,
                     const int32_t* dst_ids, size_t n_dst, uint32_t num_tokens, uint32_t first_layer,
                     uint32_t num_layers, uint64_t max_write_bytes);
// Equal block sizes, one destination block per source block, every token.
inline WritePlan build_plan(const LayoutSpec& src, const LayoutSpec& dst, const int32_t* src_ids,
                            const int32_t* dst_ids, size_t num_ids, uint32_t first_layer, uint32_t num_layers,
                            uint64_t max_write_bytes) {
  return build_plan(src, dst, src_ids, num_ids, dst_ids, num_ids, 0, first_layer, num_layers, max_write_bytes);
}

// How many writes starting at index i (and before end, within one layer) one gathered write takes: at most
// max_iov, and never more than ImmCode::kMaxGranules granules together (*granules receives their sum). The agent
// posts with this rule and counts its expected completions with it, so the two can never disagree.
size_t gather_run(const WritePlan& plan, uint32_t i, uint32_t end, size_t max_iov, uint32_t* granules);

// How many writes starting at i one staging slot takes: their bytes fit in slot_bytes, at most max_pieces pieces
// and at most ImmCode::kMaxGranules granules together (*granules receives the sum). A piece is a write, or with
// merge_dst a run of writes whose destinations follow each other (the slot is contiguous, so such a run goes out
// as one remote range: a token-major head slice packs 16 writes of a chunk into one). Posting through the staging
// ring and counting a staged send's expected completions both use this rule.
size_t staged_run(const WritePlan& plan, uint32_t i, uint32_t end, uint64_t slot_bytes, size_t max_pieces,
                  uint32_t* granules, bool merge_dst = false);

// The receiver's expectation for one layer of dst_ids from the sender's pool `src`: granules it must count (the
// pieces of every token run, as build_plan cuts them). Validates dst ids as above.
uint32_t expected_granules(const LayoutSpec& src, const LayoutSpec& dst, const int32_t* dst_ids, size_t n_dst,
                           uint32_t num_tokens = 0);

}  // namespace kvxfer
