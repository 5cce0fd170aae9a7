// The device halves of LayerSignal.record(layer) and DeviceCounter.wait_on_stream(layer).
//
// Both are one-thread kernels whose per-replay state lives in device memory: a kernel node captured in a CUDA
// graph replays with frozen arguments, so a sequence number passed as an argument would publish the same value on
// every replay and the host could not tell replays apart. Instead the kernel bumps its own counter.
#include "cuda/api.cuh"

namespace kvxfer {
namespace cuda {

__global__ void layer_signal_kernel(volatile uint64_t* host_slots, uint64_t* dev_counts, uint32_t layer) {
  // Stream order has finished the layer's kernels; the fence makes their writes visible system-wide (to the CPU
  // and the NIC) before the slot value that tells the watcher to post them.
  __threadfence_system();
  const uint64_t v = dev_counts[layer] + 1;  // device memory: no PCIe read on the model's stream
  dev_counts[layer] = v;
  host_slots[layer] = v;
  __threadfence_system();  // push the posted write out now rather than whenever the write buffer drains
}

cudaError_t launch_layer_signal(volatile uint64_t* host_slots, uint64_t* dev_counts, uint32_t layer,
                                cudaStream_t stream) {
  (void)cudaGetLastError();  // only this launch's error is returned, not an earlier call's
  layer_signal_kernel<<<1, 1, 0, stream>>>(host_slots, dev_counts, layer);
  return cudaGetLastError();
}

__device__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

constexpr uint32_t kMaxWaitLayers = 256;  // DeviceCounter's limit (csrc/signals/layer_signal.cpp)

__global__ void counter_wait_kernel(const volatile uint32_t* host_words, const volatile uint32_t* fail_word,
                                    volatile uint32_t* error_word, uint32_t* dev_waits, int layer,
                                    uint32_t num_layers, uint64_t timeout_ns) {
  const uint32_t lo = layer < 0 ? 0 : static_cast<uint32_t>(layer);
  const uint32_t hi = layer < 0 ? num_layers : lo + 1;
  // Claim this execution's target on every layer first, so an early exit (failure, timeout) leaves the k-th-wait
  // numbering of all layers intact for the next replay. Atomic: waits on two streams (or two graphs) may run at
  // once, and a lost increment would release every later wait one recv early. Each wait keeps the target it
  // claimed rather than re-reading the counter another wait may have bumped since.
  uint32_t targets[kMaxWaitLayers];
  for (uint32_t l = lo; l < hi; ++l) targets[l - lo] = atomicAdd(&dev_waits[l], 1u) + 1u;
  const uint64_t start = globaltimer_ns();
  for (uint32_t l = lo; l < hi; ++l) {
    const uint32_t target = targets[l - lo];
    while (static_cast<int32_t>(host_words[l] - target) < 0) {
      if (static_cast<int32_t>(*fail_word - target) >= 0 || globaltimer_ns() - start > timeout_ns) {
        *error_word = *error_word + 1;  // host-mapped: no system-scope atomics over PCIe; a count, read as "> 0"
        __threadfence_system();
        return;
      }
      __nanosleep(200);  // each poll is a PCIe read; do not flood the bus
    }
  }
  __threadfence_system();  // later kernels on the stream read the received KV only after this point
}

cudaError_t launch_counter_wait(const volatile uint32_t* host_words, const volatile uint32_t* fail_word,
                                volatile uint32_t* error_word, uint32_t* dev_waits, int layer, uint32_t num_layers,
                                uint64_t timeout_ns, cudaStream_t stream) {
  if (num_layers > kMaxWaitLayers) return cudaErrorInvalidValue;
  (void)cudaGetLastError();  // only this launch's error is returned, not an earlier call's
  counter_wait_kernel<<<1, 1, 0, stream>>>(host_words, fail_word, error_word, dev_waits, layer, num_layers,
                                           timeout_ns);
  return cudaGetLastError();
}

cudaError_t preload_layer_signal_kernels() {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, layer_signal_kernel);  // loads the kernel into the context
  return err == cudaSuccess ? cudaFuncGetAttributes(&attr, counter_wait_kernel) : err;
}

}  // namespace cuda
}  // namespace kvxfer
