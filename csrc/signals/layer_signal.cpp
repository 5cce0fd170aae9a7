#include "signals/layer_signal.h"

#include <algorithm>
#include <cmath>

#include "core/errors.h"
#ifdef KVXFER_HAVE_CUDA
#include "cuda/api.cuh"
#endif

namespace kvxfer {
namespace {
static_assert(sizeof(std::atomic<uint64_t>) == 8 && std::atomic<uint64_t>::is_always_lock_free,
              "the device writes slots as plain 64-bit words");
static_assert(sizeof(std::atomic<uint32_t>) == 4 && std::atomic<uint32_t>::is_always_lock_free,
              "the device reads counter words as plain 32-bit words");
constexpr uint32_t kMaxLayers = 256;  // the wire format's layer field (csrc/core/imm.h)

// A device address inside mapped memory, at the same offset as `host_ptr` is inside the host view.
template <typename T>
T* device_view(const MappedMemory& m, const void* host_ptr) {
  const auto off = static_cast<const char*>(host_ptr) - static_cast<const char*>(m.host());
  return reinterpret_cast<T*>(static_cast<char*>(m.device()) + off);
}

[[noreturn]] void throw_no_device(const char* what, const MappedMemory& m) {
  KVXFER_THROW(TransportUnavailable, what << " needs a CUDA device: " << m.why_host()
                                          << ". Host-side parts (bind, the watcher, counters) work without one.");
}

#ifdef KVXFER_HAVE_CUDA
// Before a launch on `stream` of a kernel that uses memory of `device`. The stream's device must be that one: the
// kernel would otherwise run on another GPU and reach our device memory through an illegal address (checked once
// per new stream; every time for the default streams, whose device is whichever is current). And a graph capturing the stream keeps pointers to our memory for every replay: remembered, so
// that memory outlives this object (the graph may outlive it).
void check_stream(uint64_t stream, int device, std::atomic<uint64_t>& checked, std::atomic<bool>& captured,
                  const char* what) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (stream > 1) {  // the legacy default stream (0 or cudaStreamLegacy) is never captured; asking is not safe
    bool capturing = false;
    if (cuda::stream_capturing(s, &capturing) != cudaSuccess || capturing) captured.store(true);
  }
  if (checked.load(std::memory_order_relaxed) == stream) return;
  int d = -1;
  KVXFER_CHECK(cuda::stream_device(s, &d) != cudaSuccess || d == device, InvalidArgument,
               what << " on a stream of cuda:" << d << ", but its memory is on cuda:" << device
                    << " (the device current when it was created); create it while cuda:" << d
                    << " is current (torch.cuda.set_device(" << d << ") or `with torch.cuda.device(" << d << "):`)");
  // Handles 0-2 (legacy, per-thread default) mean the current device's default stream: another device may be
  // current next time, so they are checked every time.
  if (stream > 2) checked.store(stream, std::memory_order_relaxed);
}
#endif

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}
}  // namespace

// ---- LayerSignal ---------------------------------------------------------------------------------------------

LayerSignal::LayerSignal(Agent& agent, uint32_t num_layers, WatcherOptions options, bool want_device)
    : num_layers_(num_layers) {
  KVXFER_CHECK(num_layers >= 1 && num_layers <= kMaxLayers, InvalidArgument,
               "num_layers=" << num_layers << ": a LayerSignal covers 1 to " << kMaxLayers << " layers");
  slots_mem_ = std::make_unique<MappedMemory>(num_layers * sizeof(uint64_t), want_device);
  slots_ = static_cast<std::atomic<uint64_t>*>(slots_mem_->host());
  if (slots_mem_->mapped()) dev_counts_ = std::make_unique<DeviceMemory>(slots_mem_->cuda_device(), num_layers * 8);
  watcher_ = std::make_unique<SignalWatcher>(agent, slots_, num_layers, options);
}

LayerSignal::~LayerSignal() {
  watcher_->stop();  // before the slots it reads are freed
  if (captured_) {  // a captured graph writes them on every replay, and it may outlive us: a few bytes stay
    (void)slots_mem_.release();
    (void)dev_counts_.release();
  }
}

void LayerSignal::check_layer(uint32_t layer) const {
  KVXFER_CHECK(layer < num_layers_, InvalidArgument,
               "layer " << layer << " is outside this LayerSignal's " << num_layers_ << " layers");
}

void LayerSignal::record(uint32_t layer, uint64_t stream) {
  check_layer(layer);
  if (!slots_mem_->mapped()) throw_no_device("LayerSignal.record", *slots_mem_);
#ifdef KVXFER_HAVE_CUDA
  check_stream(stream, slots_mem_->cuda_device(), checked_stream_, captured_, "LayerSignal.record");
  cudaError_t err = cuda::launch_layer_signal(device_view<volatile uint64_t>(*slots_mem_, slots_),
                                              static_cast<uint64_t*>(dev_counts_->get()), layer,
                                              reinterpret_cast<cudaStream_t>(stream));
  KVXFER_CHECK(err == cudaSuccess, InvalidArgument,
               "launching the layer-signal kernel for layer " << layer << " on stream 0x" << std::hex << stream
                   << std::dec << " failed: " << cuda::error_string(err)
                   << " (is the stream on device " << slots_mem_->cuda_device() << ", where the signal was created?)");
#endif
}

void LayerSignal::host_record(uint32_t layer) {
  check_layer(layer);
  KVXFER_CHECK(!slots_mem_->mapped(), InvalidArgument,
               "_host_record on a device-mapped LayerSignal: its records are counted on the device too, and a host "
               "record would put the two out of step (the watcher then stops); create it with device=False to play "
               "the device from the host");
  if (probe_) probe_[layer].store(now_ns(), std::memory_order_release);
  // The only writer is "the device": a load and a store, like the kernel, released so the writer's earlier stores
  // (the layer's data) are visible to the watcher before the count.
  slots_[layer].store(slots_[layer].load(std::memory_order_relaxed) + 1, std::memory_order_release);
}

uint64_t LayerSignal::slot(uint32_t layer) const {
  check_layer(layer);
  return slots_[layer].load(std::memory_order_acquire);
}

void LayerSignal::enable_probe() {
  if (!probe_) {
    probe_.reset(new std::atomic<int64_t>[num_layers_]);
    for (uint32_t i = 0; i < num_layers_; ++i) probe_[i].store(0);
  }
  watcher_->set_probe(probe_.get());
}

// ---- DeviceCounter -------------------------------------------------------------------------------------------

DeviceCounter::DeviceCounter(uint32_t num_layers, bool want_device) : num_layers_(num_layers) {
  KVXFER_CHECK(num_layers >= 1 && num_layers <= kMaxLayers, InvalidArgument,
               "num_layers=" << num_layers << ": a DeviceCounter covers 1 to " << kMaxLayers << " layers");
  // Words 0 and 1: fail and error; the layer words start on their own 64-byte line, away from them.
  mem_ = std::make_shared<MappedMemory>(64 + num_layers * sizeof(uint32_t), want_device);
  auto* base = static_cast<std::atomic<uint32_t>*>(mem_->host());
  fail_ = base;
  error_ = base + 1;
  words_ = base + 16;
  if (mem_->mapped()) dev_waits_ = std::make_unique<DeviceMemory>(mem_->cuda_device(), num_layers * 4);
}

DeviceCounter::~DeviceCounter() {
  if (captured_) {  // a captured graph's wait kernels read and bump them on every replay: a few bytes stay
    new std::shared_ptr<MappedMemory>(mem_);
    (void)dev_waits_.release();
  }
}

uint32_t DeviceCounter::sync() {
  std::lock_guard<std::mutex> lock(mu_);
  const uint32_t g = generation_.load(std::memory_order_acquire);
  if (!dev_waits_) return g;
#ifdef KVXFER_HAVE_CUDA
  std::vector<uint32_t> waits(num_layers_, g);
  cudaError_t err = cuda::upload(mem_->cuda_device(), dev_waits_->get(), waits.data(), num_layers_ * 4);
  KVXFER_CHECK(err == cudaSuccess, TransportUnavailable,
               "DeviceCounter.sync: writing the wait counts on cuda:" << mem_->cuda_device()
                                                                      << " failed: " << cuda::error_string(err));
#endif
  return g;
}

uint32_t DeviceCounter::attach(const std::shared_ptr<RecvState>& recv) {
  KVXFER_CHECK(recv->first_layer + recv->num_layers <= num_layers_, InvalidArgument,
               "recv " << recv->xfer_id << " covers layers [" << recv->first_layer << ", "
                       << recv->first_layer + recv->num_layers << ") but this DeviceCounter has " << num_layers_);
  std::lock_guard<std::mutex> lock(mu_);
  KVXFER_CHECK(!current_ || current_->state() != TransferState::Pending, InvalidArgument,
               "recv " << current_->xfer_id << " attached to this DeviceCounter is still pending ("
                       << current_->layers_done() << "/" << current_->num_layers
                       << " layers); attach the next recv once it is done or failed, or use another DeviceCounter");
  const uint32_t g = generation_.load(std::memory_order_relaxed) + 1;
  auto mirror = std::make_shared<LayerMirror>();
  mirror->owner = mem_;
  mirror->words = words_;
  mirror->fail_word = fail_;
  mirror->value = g;
  recv->set_mirror(std::move(mirror));  // throws if the recv already has a counter; nothing changed then
  // Layers this recv does not carry are done for this generation right away, so a graph that waits on every layer
  // works with a recv of a layer subset.
  for (uint32_t l = 0; l < num_layers_; ++l)
    if (l < recv->first_layer || l >= recv->first_layer + recv->num_layers) words_[l].store(g, std::memory_order_release);
  generation_.store(g, std::memory_order_release);
  current_ = recv;
  return g;
}

void DeviceCounter::wait_on_stream(int layer, uint64_t stream, double timeout_s) {
  KVXFER_CHECK(layer < static_cast<int>(num_layers_), InvalidArgument,
               "layer " << layer << " is outside this DeviceCounter's " << num_layers_ << " layers");
  KVXFER_CHECK(timeout_s > 0 && std::isfinite(timeout_s), InvalidArgument,
               "timeout_s must be a positive number of seconds, got " << timeout_s);
  if (!mem_->mapped()) throw_no_device("DeviceCounter.wait_on_stream", *mem_);
#ifdef KVXFER_HAVE_CUDA
  check_stream(stream, mem_->cuda_device(), checked_stream_, captured_, "DeviceCounter.wait_on_stream");
  cudaError_t err = cuda::launch_counter_wait(
      device_view<const volatile uint32_t>(*mem_, words_), device_view<const volatile uint32_t>(*mem_, fail_),
      device_view<volatile uint32_t>(*mem_, error_), static_cast<uint32_t*>(dev_waits_->get()), layer, num_layers_,
      static_cast<uint64_t>(timeout_s * 1e9), reinterpret_cast<cudaStream_t>(stream));
  KVXFER_CHECK(err == cudaSuccess, InvalidArgument,
               "launching the counter-wait kernel on stream 0x" << std::hex << stream << std::dec
                   << " failed: " << cuda::error_string(err));
#endif
}

uint32_t DeviceCounter::word(uint32_t layer) const {
  KVXFER_CHECK(layer < num_layers_, InvalidArgument,
               "layer " << layer << " is outside this DeviceCounter's " << num_layers_ << " layers");
  return words_[layer].load(std::memory_order_acquire);
}

uint32_t DeviceCounter::layers_done() const {
  const uint32_t g = generation_.load(std::memory_order_acquire);
  if (g == 0) return 0;
  uint32_t n = 0;
  for (uint32_t l = 0; l < num_layers_; ++l) n += words_[l].load(std::memory_order_acquire) >= g;
  return n;
}

}  // namespace kvxfer
