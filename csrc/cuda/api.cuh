// The only header shared by .cu files and host code: raw pointers and cudaStream_t, nothing else.
// Host code includes it only under KVXFER_HAVE_CUDA and reaches the runtime through the functions declared here.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace kvxfer {
namespace cuda {

// ---- layer signals (csrc/cuda/layer_signal.cu) --------------------------------------------------------------
// Enqueues on `stream` a one-thread kernel that increments dev_counts[layer] (device memory) and stores the new
// value into host_slots[layer] (host-mapped memory a watcher thread polls), fenced at system scope so the layer's
// earlier writes are visible first. Capturable in a CUDA graph: the node's arguments are frozen, but each replay
// reads and bumps the device-side count, so every replay publishes a new value.
cudaError_t launch_layer_signal(volatile uint64_t* host_slots, uint64_t* dev_counts, uint32_t layer,
                                cudaStream_t stream);

// Enqueues on `stream` a one-thread kernel that bumps dev_waits[layer] to target and spins until
// host_words[layer] >= target (a kvxfer.DeviceCounter generation) or *fail_word >= target or timeout_ns passes; on
// the last two it adds 1 to *error_word and returns, so a failed transfer never hangs the stream. layer < 0 waits
// for every layer in [0, num_layers). Capturable, for the same reason as launch_layer_signal.
cudaError_t launch_counter_wait(const volatile uint32_t* host_words, const volatile uint32_t* fail_word,
                                volatile uint32_t* error_word, uint32_t* dev_waits, int layer, uint32_t num_layers,
                                uint64_t timeout_ns, cudaStream_t stream);

// ---- batched copies (csrc/cuda/gather_copy.cu) --------------------------------------------------------------
struct CopyDesc {
  uint64_t dst, src, nbytes;
};
// Enqueues on `stream` one kernel that performs n copies; descs must be readable by the device (device memory or
// pinned mapped host memory) until the kernel completes, and every src/dst reachable from the device. At most
// max_blocks blocks of 256 threads.
cudaError_t launch_gather_copy(const CopyDesc* descs, uint32_t n, uint32_t max_blocks, cudaStream_t stream);

// One layer of launch_gather_layers: where the layer starts on each side, and the word that says it landed.
struct LayerCopy {
  uint64_t src_base, dst_base;  // added to every descriptor's src / dst
  uint64_t stamp;               // stored into done_words[word] once every copy of the layer is visible system-wide
  uint64_t word;
};
constexpr uint32_t kMaxGatherLayers = 256;
// Enqueues on `stream` one kernel that performs the n copies of `rel` (src/dst offsets relative to each layer's
// bases) for each of num_layers (<= kMaxGatherLayers) layers, every block going layer by layer and fencing after
// every layers_per_fence (>= 1) of them. The last block to finish a layer stores its stamp into done_words[word]
// (pinned mapped host memory), so the host sees layers land while later ones still copy, with one launch and no
// event per layer. arrivals: device memory of at least num_layers zeroed words, left zeroed for the next launch on
// the same stream. rel and layers must stay readable by the device until the kernel completes.
cudaError_t launch_gather_layers(const CopyDesc* rel, uint32_t n, const LayerCopy* layers, uint32_t num_layers,
                                 uint32_t layers_per_fence, uint32_t* arrivals, volatile uint64_t* done_words,
                                 uint32_t max_blocks, cudaStream_t stream);

// ---- memory (csrc/cuda/memory.cu) ---------------------------------------------------------------------------
// Number of usable devices; an error (no driver, no device) is returned, never thrown.
cudaError_t device_count(int* count);
cudaError_t current_device(int* device);
// Pinned, mapped, portable host memory, zeroed, and its device pointer.
cudaError_t alloc_host_mapped(size_t nbytes, void** host, void** device);
cudaError_t free_host_mapped(void* host);
// Device memory on `device`, zeroed.
cudaError_t alloc_device(int device, size_t nbytes, void** ptr);
cudaError_t free_device(int device, void* ptr);
// Copies host bytes into device memory of `device` on a stream of our own and waits for them (not the legacy
// default stream, which would wait for every blocking stream of the device).
cudaError_t upload(int device, void* dst, const void* src, size_t nbytes);
const char* error_string(cudaError_t err);
// Whether `stream` is being captured into a CUDA graph now (the graph then keeps pointers to our memory).
cudaError_t stream_capturing(cudaStream_t stream, bool* capturing);
// The device `stream` belongs to (the legacy and per-thread default streams: the current device).
cudaError_t stream_device(cudaStream_t stream, int* device);
// Loads every kvxfer kernel into `device`'s context now. CUDA loads kernels lazily by default (CUDA_MODULE_LOADING
// =LAZY since 12.2), and loading one may wait for the context to go idle: a first gather or wait kernel launched
// while a counter-wait kernel spins for data that launch is to deliver would then stall until the wait times out.
cudaError_t preload_kernels(int device);
cudaError_t preload_layer_signal_kernels();  // current device; layer_signal.cu
cudaError_t preload_gather_kernels();        // current device; gather_copy.cu

}  // namespace cuda
}  // namespace kvxfer
