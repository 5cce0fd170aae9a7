// KVLayout arithmetic: a paged KV pool described once, as data.
//
// A pool has num_layers x num_planes x num_blocks chunks. A chunk is the bytes of one block of one plane of one
// layer (planes are K and V, or a single plane for MLA latents / K+V-interleaved layouts) and is contiguous:
//   offset(layer, plane, block) = layer_offset[layer] + plane * plane_stride + block * block_stride
// within region layer_region[layer]. This covers per-layer tensors (one region per layer, or one allocation with
// a layer stride) and blocks-first pools (block_stride spans every layer). The semantic fields (block_size, heads,
// head_dim, dtype) only take part in the compatibility check: two pools exchange blocks when every field but
// num_blocks and the addressing matches, or, for pools of different tensor-parallel ranks, when they hold KV heads
// of the same model and have at least one head in common (the plan then moves the common heads: plan.h
// chunk_pieces), or when only their block sizes differ (the plan moves the request's tokens: plan.h token_runs).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace kvxfer {

struct LayoutSpec {
  std::string kind;           // preset name, for messages ("vllm_flash", "flashinfer", "mla", "blocks_first", ...)
  uint32_t num_layers = 0;
  uint32_t num_blocks = 0;
  uint32_t num_planes = 0;    // 2 for separate K/V planes, 1 for MLA or K/V stored together in one chunk
  uint32_t block_size = 0;    // tokens per block
  uint32_t num_kv_heads = 0;  // 0 for MLA
  uint32_t head_dim = 0;      // latent dim for MLA
  std::string dtype;          // "bfloat16", "float16", "float32", "float8_e4m3fn", "uint8", ...
  uint64_t chunk_bytes = 0;   // bytes of one (layer, plane, block) chunk
  uint64_t plane_stride = 0;  // bytes between plane p and p+1 of the same block and layer
  uint64_t block_stride = 0;  // bytes between block b and b+1 of the same plane and layer
  // Tensor parallelism: the pool holds KV heads [head_begin, head_begin + num_kv_heads) of total_kv_heads (0: all
  // of them). Inside a chunk the bytes are [block_size][num_kv_heads][row] (token-major, "NHD") or, head_major,
  // [num_kv_heads][block_size][row] ("HND"); a row is one head of one token (head_dim elements, or K and V together).
  uint32_t head_begin = 0;
  uint32_t total_kv_heads = 0;
  bool head_major = false;
  std::vector<uint32_t> layer_region;  // [num_layers] index into the pool's regions
  std::vector<uint64_t> layer_offset;  // [num_layers] byte offset of (layer, plane 0, block 0) in that region

  uint64_t offset(uint32_t layer, uint32_t plane, uint32_t block) const {
    return layer_offset[layer] + plane * plane_stride + block * block_stride;
  }
  // Bytes one block occupies across all planes of one layer (what the receiver counts per block per layer).
  uint64_t block_bytes_per_layer() const { return chunk_bytes * num_planes; }
  uint32_t total_heads() const { return total_kv_heads ? total_kv_heads : num_kv_heads; }
  uint32_t head_end() const { return head_begin + num_kv_heads; }
  // Bytes of one row: one head of one token (one token of a latent cache, which has no heads).
  uint64_t row_bytes() const {
    return chunk_bytes / (static_cast<uint64_t>(block_size) * (num_kv_heads ? num_kv_heads : 1));
  }
  // Whether one token's row of one head is contiguous, so that tokens can move between blocks of different sizes
  // or a partial block can move alone. vLLM's CPU backend stores each (block, head) as K transposed
  // ([head_dim][block_size]) then V ([block_size][head_dim]): a head's bytes are contiguous, a token's are not.
  bool token_rows() const { return kind != "vllm_cpu"; }
  // Both pools hold the same heads in the same byte order: a chunk moves whole.
  bool same_heads(const LayoutSpec& o) const {
    return head_begin == o.head_begin && num_kv_heads == o.num_kv_heads &&
           (head_major == o.head_major || num_kv_heads <= 1 || block_size <= 1);
  }
  // A 64-bit hash of the semantic fields: equal fingerprints <=> the pools hold the same heads of the same model.
  uint64_t fingerprint() const;
};

// Internal consistency: counts in range, chunks fit their strides, every chunk of every layer fits in its region.
// region_nbytes[i] is the size of region i. Throws InvalidArgument / PoolTooSmall naming the field.
void validate_layout(const LayoutSpec& layout, const std::vector<uint64_t>& region_nbytes);

// Throws LayoutMismatch naming the first field that differs (with both values) when src blocks cannot be written
// into dst blocks: the model's shape (layers, dtype, head_dim, K/V planes, total KV heads) must agree; pools holding
// the same heads in blocks of the same size must have equal chunks, others equal rows (one head of one token);
// pools of different TP ranks need a head in common.
void check_compatible(const LayoutSpec& src, const LayoutSpec& dst);
// check_compatible as a yes/no, for callers that leave naming the mismatch to send().
bool can_exchange(const LayoutSpec& src, const LayoutSpec& dst);

}  // namespace kvxfer
