// One kernel that performs a whole batch of scattered copies (a layer's KV chunks): the copy engines pay a few
// microseconds per copy, which caps a layer of 512 chunks of 32 KiB near 7 GB/s on an H100; one launch for all of
// them runs at device-memory speed. Used by CopyQueue when every source and destination is reachable from the
// device (local device memory, a peer's CUDA IPC mapping, pinned mapped host memory). gather_layers_kernel does the
// same chunks for several layers in one launch and reports each layer as it lands (the cuda_ipc path).
#include "cuda/api.cuh"

namespace kvxfer {
namespace cuda {

namespace {

constexpr int kThreads = 256;

__device__ void copy_bytes(unsigned char* dst, const unsigned char* src, uint64_t n, unsigned tid, unsigned nthreads) {
  for (uint64_t i = tid; i < n; i += nthreads) dst[i] = src[i];
}

// One chunk, by the whole block: 16-byte vectors, four in flight per thread, for the aligned bulk (KV chunks are
// whole multiples), bytes for a tail or unaligned chunks.
__device__ void copy_chunk(unsigned char* dst, const unsigned char* src, uint64_t nbytes) {
  if (((reinterpret_cast<uint64_t>(dst) | reinterpret_cast<uint64_t>(src)) & 15) != 0) {
    copy_bytes(dst, src, nbytes, threadIdx.x, kThreads);
    return;
  }
  const uint64_t vecs = nbytes / 16;
  auto* dv = reinterpret_cast<uint4*>(dst);
  const auto* sv = reinterpret_cast<const uint4*>(src);
  uint64_t i = threadIdx.x;
  for (; i + 3 * kThreads < vecs; i += 4 * kThreads) {
    const uint4 a = sv[i], b = sv[i + kThreads], e = sv[i + 2 * kThreads], f = sv[i + 3 * kThreads];
    dv[i] = a;
    dv[i + kThreads] = b;
    dv[i + 2 * kThreads] = e;
    dv[i + 3 * kThreads] = f;
  }
  for (; i < vecs; i += kThreads) dv[i] = sv[i];
  copy_bytes(dst + vecs * 16, src + vecs * 16, nbytes - vecs * 16, threadIdx.x, kThreads);
}

__global__ void gather_copy_kernel(const CopyDesc* descs, uint32_t n) {
  for (uint32_t d = blockIdx.x; d < n; d += gridDim.x) {
    const CopyDesc c = descs[d];
    copy_chunk(reinterpret_cast<unsigned char*>(c.dst), reinterpret_cast<const unsigned char*>(c.src), c.nbytes);
  }
  // Writes into another process's memory (CUDA IPC) or host memory must be visible there once the event that
  // follows this kernel completes; stream order gives that for the device, the fence for the system.
  __threadfence_system();
}

constexpr uint32_t kCachedDescs = 16;

__global__ void gather_layers_kernel(const CopyDesc* rel, uint32_t n, const LayerCopy* layers, uint32_t num_layers,
                                     uint32_t layers_per_fence, uint32_t* arrivals, volatile uint64_t* done_words) {
  // The descriptors live in host memory: this block's own (rel[blockIdx.x + k * gridDim.x]) and every layer's
  // bases are read once into shared memory, not once per layer across PCIe.
  __shared__ CopyDesc mine[kCachedDescs];
  __shared__ LayerCopy bases[kMaxGatherLayers];
  const uint32_t count = blockIdx.x < n ? (n - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  const uint32_t cached = count < kCachedDescs ? count : kCachedDescs;
  for (uint32_t k = threadIdx.x; k < cached; k += blockDim.x) mine[k] = rel[blockIdx.x + k * gridDim.x];
  for (uint32_t l = threadIdx.x; l < num_layers; l += blockDim.x) bases[l] = layers[l];
  __syncthreads();
  uint32_t first_unfenced = 0;
  for (uint32_t l = 0; l < num_layers; ++l) {
    const uint64_t sb = bases[l].src_base, db = bases[l].dst_base;
    for (uint32_t k = 0; k < count; ++k) {
      const CopyDesc c = k < cached ? mine[k] : rel[blockIdx.x + k * gridDim.x];
      copy_chunk(reinterpret_cast<unsigned char*>(db + c.dst), reinterpret_cast<const unsigned char*>(sb + c.src),
                 c.nbytes);
    }
    // A fence drains the block's writes (the memory system idles meanwhile), so a block that copies little per
    // layer fences once per group of layers_per_fence layers (the layers of one launch were ready together).
    if (l + 1 - first_unfenced < layers_per_fence && l + 1 < num_layers) continue;
    // Every thread's writes of the group are visible system-wide before its block counts itself; the block that
    // counts a layer last therefore knows the whole layer landed, and fences again before it publishes the word.
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) {
      for (uint32_t g = first_unfenced; g <= l; ++g) {
        if (atomicAdd(&arrivals[g], 1u) != gridDim.x - 1) continue;
        arrivals[g] = 0;  // every block has counted: zero for the next launch on this stream
        __threadfence_system();
        done_words[bases[g].word] = bases[g].stamp;
      }
    }
    first_unfenced = l + 1;
  }
}

}  // namespace

cudaError_t launch_gather_copy(const CopyDesc* descs, uint32_t n, uint32_t max_blocks, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const uint32_t blocks = n < max_blocks ? n : max_blocks;
  (void)cudaGetLastError();  // only this launch's error is returned, not an earlier call's
  gather_copy_kernel<<<blocks, kThreads, 0, stream>>>(descs, n);
  return cudaGetLastError();
}

cudaError_t launch_gather_layers(const CopyDesc* rel, uint32_t n, const LayerCopy* layers, uint32_t num_layers,
                                 uint32_t layers_per_fence, uint32_t* arrivals, volatile uint64_t* done_words,
                                 uint32_t max_blocks, cudaStream_t stream) {
  if (n == 0 || num_layers == 0 || num_layers > kMaxGatherLayers || layers_per_fence == 0) return cudaErrorInvalidValue;
  const uint32_t blocks = n < max_blocks ? n : max_blocks;
  (void)cudaGetLastError();  // only this launch's error is returned, not an earlier call's
  gather_layers_kernel<<<blocks, kThreads, 0, stream>>>(rel, n, layers, num_layers, layers_per_fence, arrivals,
                                                        done_words);
  return cudaGetLastError();
}

cudaError_t preload_gather_kernels() {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, gather_copy_kernel);  // loads the kernel into the context
  return err == cudaSuccess ? cudaFuncGetAttributes(&attr, gather_layers_kernel) : err;
}

}  // namespace cuda
}  // namespace kvxfer
