// LayerSignal: per-layer record counters in host-mapped memory, the kernel launch that bumps them from a stream,
// and the SignalWatcher that turns new counts into Agent::layer_ready calls (see watcher.h for the model).
//
// DeviceCounter: a receiver-side, reusable set of per-layer words in host-mapped memory that a decode stream (or a
// CUDA graph) waits on with a spin kernel. attach(recv) gives the recv the next generation g (1, 2, ...); when a
// layer of that recv completes the progress thread stores g into words[layer] (TransferBase's LayerMirror), and a
// failure stores g into the fail word. The k-th wait kernel executed for a layer waits for words[layer] >= k, so a
// graph captured once waits for the k-th attached recv on its k-th replay without any host-side reset (a reset could
// race with a wait still queued on the stream). Generations only grow, so attach() refuses a new recv while the
// previous one is still pending: a later recv finishing first would otherwise release an earlier wait.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/transfer.h"
#include "signals/memory.h"
#include "signals/watcher.h"

namespace kvxfer {

class LayerSignal {
 public:
  // want_device=false forces host memory (tests, or a model that records from the host).
  LayerSignal(Agent& agent, uint32_t num_layers, WatcherOptions options, bool want_device);
  ~LayerSignal();

  uint32_t num_layers() const { return num_layers_; }
  bool on_device() const { return slots_mem_->mapped(); }
  const std::string& why_host() const { return slots_mem_->why_host(); }
  int cuda_device() const { return slots_mem_->cuda_device(); }

  // Enqueues the device-side record of `layer` on `stream` (a cudaStream_t as an integer; 0 = legacy default).
  // Throws TransportUnavailable when the signal's memory is not device-mapped.
  void record(uint32_t layer, uint64_t stream);
  // What the kernel does, done by the calling thread: bumps slots[layer]. For tests and host-driven models; refused
  // on a device-mapped signal, whose device-side count it would fall out of step with.
  void host_record(uint32_t layer);

  SignalWatcher& watcher() { return *watcher_; }
  uint64_t slot(uint32_t layer) const;
  void enable_probe();

 private:
  void check_layer(uint32_t layer) const;
  const uint32_t num_layers_;
  std::atomic<uint64_t> checked_stream_{~uint64_t{0}};  // the last stream found on our device
  std::atomic<bool> captured_{false};  // a CUDA graph holds our pointers: the memory outlives us (destructor)
  std::unique_ptr<MappedMemory> slots_mem_;
  std::unique_ptr<DeviceMemory> dev_counts_;
  std::atomic<uint64_t>* slots_;
  std::unique_ptr<std::atomic<int64_t>[]> probe_;
  std::unique_ptr<SignalWatcher> watcher_;
};

class DeviceCounter : public std::enable_shared_from_this<DeviceCounter> {
 public:
  DeviceCounter(uint32_t num_layers, bool want_device);
  ~DeviceCounter();

  uint32_t num_layers() const { return num_layers_; }
  bool on_device() const { return mem_->mapped(); }
  const std::string& why_host() const { return mem_->why_host(); }

  // Gives `recv` the next generation and mirrors its layer completions here; layers outside the recv's range
  // count as done at once. Returns the generation. Throws InvalidArgument if the previous recv is still pending.
  uint32_t attach(const std::shared_ptr<RecvState>& recv);
  // Enqueues the spin-wait kernel (layer < 0: every layer) on `stream`. TransportUnavailable without a device.
  void wait_on_stream(int layer, uint64_t stream, double timeout_s);
  // Makes the next wait kernel on each layer wait for the next attach(): wait kernels that ran without a recv of
  // their own (warm-up forwards before capture) each took a number, and every later wait would wait for a later
  // recv than its own (until its timeout). Call it with no wait kernel queued or running (after
  // torch.cuda.synchronize()). Returns the current generation. Without a device there is nothing to reset.
  uint32_t sync();

  uint32_t generation() const { return generation_.load(std::memory_order_acquire); }
  uint32_t word(uint32_t layer) const;         // host view of words[layer]
  uint32_t fail_word() const { return fail_->load(std::memory_order_acquire); }
  uint32_t device_errors() const { return error_->load(std::memory_order_acquire); }
  uint32_t layers_done() const;                // layers whose word reached the current generation

 private:
  const uint32_t num_layers_;
  std::shared_ptr<MappedMemory> mem_;          // [fail, error, pad.., words[num_layers]]; shared with the mirrors
  std::unique_ptr<DeviceMemory> dev_waits_;
  std::atomic<uint32_t>* fail_;
  std::atomic<uint32_t>* error_;
  std::atomic<uint32_t>* words_;
  std::atomic<uint64_t> checked_stream_{~uint64_t{0}};
  std::atomic<bool> captured_{false};
  std::mutex mu_;
  std::atomic<uint32_t> generation_{0};
  std::shared_ptr<RecvState> current_;
};

}  // namespace kvxfer
