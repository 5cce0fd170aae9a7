// Agent: the caller-thread half (construction, registration, peers, send/recv). The progress thread is in
// agent_progress.cpp.
#include "core/agent.h"

#include <unordered_map>

#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "core/host_range.h"
#include "core/imm.h"
#include "core/plan.h"
#include "transports/host_ipc/cma.h"
#include "transports/staged/landing.h"
#ifdef KVXFER_HAVE_LIBFABRIC
#include "transports/fabric/fabric_transport.h"
#endif
#ifdef KVXFER_HAVE_UCX
#include "transports/ucx/ucx_transport.h"
#endif

namespace kvxfer {

namespace {

// The signal pad's fabric key: pool regions use ((pool + 1) << 16) | region, so this one never collides.
constexpr uint64_t kSignalPadKey = 0xFFFF;
constexpr uint64_t kLandingRingMaxBytes = uint64_t{16} << 30;

std::string read_first_line(const char* path) {
  std::ifstream f(path);
  std::string line;
  std::getline(f, line);
  return line;
}

// A pidfd for a same-host peer's process (readable once it exits), or -1 (no pidfd_open here: Linux < 5.3, or
// seccomp): liveness then falls back to kill() and /proc.
int open_pidfd(pid_t pid) {
#ifdef SYS_pidfd_open
  return static_cast<int>(syscall(SYS_pidfd_open, pid, 0));  // close-on-exec by default
#else
  (void)pid;
  return -1;
#endif
}

// Same-host peers are reached directly (CMA for host pools, CUDA IPC for GPU pools) unless a fabric was named.
bool wants_direct_path(const std::string& transport) {
  return transport == "auto" || transport == "shm" || transport == "cma" || transport == "cuda_ipc";
}

std::string fabric_provider_for(const AgentOptions& o) {
  const std::string& t = o.transport;
  std::string provider;
  if (t == "auto" || t == "shm" || t == "cma" || t == "cuda_ipc") provider = "";
  else if (t == "fi_shm") provider = "shm";
  else if (t == "tcp" || t == "efa" || t == "verbs") provider = t;
  else
    KVXFER_THROW(InvalidArgument, "unknown transport '" << t
                                                        << "'; choose auto, shm, cma, cuda_ipc, tcp, fi_shm, efa, verbs or ucx "
                                                           "(`python -m kvxfer info` lists what works here)");
  if (!o.interface.empty()) provider += "@" + o.interface;
  return provider;
}

std::unique_ptr<Transport> open_transport(const AgentOptions& o) {
  if (o.transport == "ucx") {
#ifdef KVXFER_HAVE_UCX
    KVXFER_CHECK(o.rails == 1, InvalidArgument,
                 "rails=" << o.rails << " with transport 'ucx': UCX spreads over its own rails (UCX_MAX_RMA_RAILS, "
                          "UCX_NET_DEVICES); leave rails at 1");
    return make_ucx_transport(o.interface);
#else
    KVXFER_THROW(TransportUnavailable, "this kvxfer build has no UCX (apt-get install libucx-dev pkg-config, then "
                                       "pip install -e . again)");
#endif
  }
#ifdef KVXFER_HAVE_LIBFABRIC
  return make_fabric_transport(fabric_provider_for(o), o.rails);
#else
  fabric_provider_for(o);
  KVXFER_THROW(TransportUnavailable, "this kvxfer build has no libfabric (apt-get install libfabric-dev "
                                     "pkg-config, then pip install -e . again); every transport but ucx needs it");
#endif
}

// How many writes post_send_ops will post for this plan (the same gather_run rule; every layer alike).
uint64_t count_gathered_writes(const WritePlan& plan, size_t max_iov) {
  uint64_t ops = 0;
  uint32_t granules;
  for (uint32_t i = 0, end = plan.writes_per_layer(); i < end; ++ops)
    i += static_cast<uint32_t>(gather_run(plan, i, end, max_iov, &granules));
  return ops * plan.num_layers;
}

uint64_t random_u64() {
  std::random_device rd;
  const uint64_t t = static_cast<uint64_t>(std::chrono::high_resolution_clock::now().time_since_epoch().count());
  return ((static_cast<uint64_t>(rd()) << 32) ^ rd() ^ (t * 0x9e3779b97f4a7c15ull)) | 1;
}

}  // namespace

namespace {
// The live Agents of this process by epoch: one closing tells the others that peer it (tell_agents_in_this_process).
// An Agent is listed once its progress thread runs and unlisted first thing in its destructor, under this lock, so
// an Agent found here stays alive while the lock is held.
std::mutex g_agents_mu;
std::unordered_map<uint64_t, Agent*>& agents_in_this_process() {
  static auto* agents = new std::unordered_map<uint64_t, Agent*>();  // never destroyed: agents may outlive statics
  return *agents;
}
}  // namespace

bool Agent::lives_in_this_process(uint64_t epoch) {
  std::lock_guard<std::mutex> lock(g_agents_mu);
  return agents_in_this_process().count(epoch) != 0;
}

Agent::Agent(AgentOptions options) : options_(std::move(options)) {
  KVXFER_CHECK(options_.default_timeout_s > 0, InvalidArgument, "timeout_s must be > 0");
  gpu::check_copy_environment();  // the progress thread builds GPU copy queues from these later
  // Peers refuse metadata whose text is not printable or runs past 4096 bytes: refuse such a name here instead.
  KVXFER_CHECK(printable_text(options_.name) && options_.name.size() <= 4096, InvalidArgument,
               "agent name " << quoted_text(options_.name) << " must be printable text (no control characters) of at "
                                                           "most 4096 bytes");
  KVXFER_CHECK(ImmCode::valid_max_peers(options_.max_peers), InvalidArgument,
               "max_peers=" << options_.max_peers << ": use a power of two from 1 to " << ImmCode::kMaxPeersLimit
                            << " (each peer gets " << ImmCode::kMaxSlots << " / max_peers transfers in flight)");
  window_slots_ = ImmCode::kMaxSlots / options_.max_peers;
  // The landing ring is pinned and registered whole the first time a pool needs it: refuse a size that would fail
  // (or take the host's memory) then, naming the product, now.
  const uint64_t ring = uint64_t{options_.max_peers} * options_.landing_slots * options_.landing_slot_bytes;
  KVXFER_CHECK(ring <= kLandingRingMaxBytes, InvalidArgument,
               "a landing ring of max_peers x landing_slots x landing_slot_bytes = "
                   << options_.max_peers << " x " << options_.landing_slots << " x " << options_.landing_slot_bytes
                   << " bytes (" << (ring >> 20) << " MiB) is more than the " << (kLandingRingMaxBytes >> 30)
                   << " GiB kvxfer allows; lower landing_slots or landing_slot_bytes, or max_peers");
  window_owner_.resize(options_.max_peers);
  KVXFER_CHECK(options_.staging == "auto" || options_.staging == "always", InvalidArgument,
               "staging='" << options_.staging << "': choose auto or always");
  KVXFER_CHECK(options_.landing == "auto" || options_.landing == "needed" || options_.landing == "always",
               InvalidArgument, "landing='" << options_.landing << "': choose auto, needed or always");
  KVXFER_CHECK(options_.landing_slots >= 1 && options_.landing_slots <= kLandingMaxSlotsPerPeer, InvalidArgument,
               "landing_slots=" << options_.landing_slots << ": a peer gets 1 to " << kLandingMaxSlotsPerPeer);
  KVXFER_CHECK(options_.landing_slot_bytes >= kLandingDataOffset + 4096 && options_.landing_slot_bytes <= (1ull << 30),
               InvalidArgument,
               "landing_slot_bytes=" << options_.landing_slot_bytes << ": use " << kLandingDataOffset + 4096
                                     << " bytes to 1 GiB");
  if (options_.transport == "cuda_ipc") {
    std::string why;
    KVXFER_CHECK(gpu::available(&why), TransportUnavailable,
                 "transport 'cuda_ipc' needs a usable GPU, but " << why << "; use auto, shm or tcp on this machine");
  }
  transport_ = open_transport(options_);
  const auto& caps = transport_->capabilities();
  coalesce_imms_ = caps.ordered_writes && coalesced_imms_wanted();
  info_.name = options_.name;
  info_.epoch = random_u64();
  info_.pid = static_cast<uint32_t>(getpid());
  KVXFER_CHECK(options_.peer_timeout_s == 0 || (options_.peer_timeout_s >= 0.2 && options_.peer_timeout_s <= 3600),
               InvalidArgument,
               "peer_timeout_s=" << options_.peer_timeout_s << ": use 0 (no heartbeat) or 0.2 to 3600 seconds");
  info_.heartbeat_ms = static_cast<uint32_t>(options_.peer_timeout_s * 1000 / 4);
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  info_.hostname = host;
  info_.boot_id = read_first_line("/proc/sys/kernel/random/boot_id");
  info_.transport = caps.name;
  info_.fabric_address = transport_->address();
  info_.remote_virt_addr = caps.remote_virt_addr;
  apply_ptracer_setting();  // before peers probe us (KVXFER_PTRACER)
  cma_cookie_ = std::make_unique<uint64_t>(random_u64());
  info_.cma_probe_addr = reinterpret_cast<uint64_t>(cma_cookie_.get());
  info_.cma_probe_cookie = *cma_cookie_;
  signal_pad_.reset(new uint64_t[8]());
  signal_key_ = transport_->register_memory(signal_pad_.get(), 8 * sizeof(uint64_t), kSignalPadKey);
  info_.signal_addr = reinterpret_cast<uint64_t>(signal_pad_.get());
  info_.signal_rkey = signal_key_.rkey;
  info_.peer_keys = caps.fences_peers;
  {
    std::lock_guard<std::mutex> domain(transport_mu_);
    expose_to_peers(signal_pad_.get(), 8 * sizeof(uint64_t), signal_key_.rkey);
  }
  if (options_.doorbell) {
    try {
      doorbell_ = std::make_unique<DoorbellRegion>(options_.max_peers);
      info_.doorbell_fd = doorbell_->fd();
    } catch (const Error& e) {
      doorbell_why_ = e.what();  // same-host peers then signal through the fabric, as before
    }
  } else {
    doorbell_why_ = "disabled (doorbell=False / KVXFER_DOORBELL=0)";
  }
  KVXFER_CHECK(options_.cma_threads <= 64, InvalidArgument,
               "cma_threads=" << options_.cma_threads << " is more than 64; use 0 or 1 for the progress thread, or 2-64");
  const unsigned threads = options_.cma_threads >= 0 ? options_.cma_threads : cma_threads_from_env();
  cma_threads_ = threads > 1 ? threads : 0;

  const size_t n_ctx = caps.max_inflight + 64;
  for (size_t i = 0; i < n_ctx; ++i) {
    contexts_.push_back(std::make_unique<OpContext>());
    free_contexts_.push_back(contexts_.back().get());
  }
  cq_fds_ = transport_->wait_fds();
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) cq_fds_.clear();  // no eventfd: commands could not end a wait, so never block
  if (doorbell_ && !cq_fds_.empty()) info_.wake_fd = wake_fd_;  // else we never block: peers need not wake us
  progress_ = std::thread([this] { progress_loop(); });
  place_progress_thread();
  std::lock_guard<std::mutex> lock(g_agents_mu);
  agents_in_this_process()[info_.epoch] = this;
}

namespace {

// KVXFER_PROGRESS_CPUS -> the CPU set it names; false (and why) for a value that is not "all" or a CPU list.
bool parse_progress_cpus(const std::string& v, cpu_set_t* set, std::string* why) {
  CPU_ZERO(set);
  if (v == "all") {
    for (int c = 0; c < CPU_SETSIZE; ++c) CPU_SET(c, set);  // the kernel keeps those this process may use
    return true;
  }
  std::stringstream items(v);
  std::string item;
  bool any = false;
  while (std::getline(items, item, ',')) {
    int first = -1, last = -1;
    char extra = 0;
    const int n = std::sscanf(item.c_str(), "%d-%d%c", &first, &last, &extra);
    if (n == 1) last = first;
    if ((n != 1 && n != 2) || first < 0 || last < first || last >= CPU_SETSIZE) {
      *why = "'" + item + "' is not a CPU number or range below " + std::to_string(CPU_SETSIZE);
      return false;
    }
    for (int c = first; c <= last; ++c) CPU_SET(c, set);
    any = true;
  }
  if (!any) *why = "it names no CPU";
  return any;
}

}  // namespace

// The progress thread starts with the affinity of the thread that created the agent. Engines often pin their
// workers (vLLM's CPU backend pins each to its compute cores), and a progress thread sharing a pinned core with
// spinning compute threads went unscheduled for seconds: KVXFER_PROGRESS_CPUS lets the operator place it.
void Agent::place_progress_thread() {
  const char* env = std::getenv("KVXFER_PROGRESS_CPUS");
  const std::string v = env ? env : "";
  if (v.empty() || v == "inherit") return;
  cpu_set_t set;
  std::string why;
  int rc = 0;
  if (parse_progress_cpus(v, &set, &why)) {
    rc = pthread_setaffinity_np(progress_.native_handle(), sizeof(set), &set);
    if (rc == 0) return;
    why = rc == EINVAL ? "none of those CPUs is available to this process" : std::strerror(rc);
  }
  // The constructor throws, so no destructor runs: stop the thread and release what the constructor took, in the
  // destructor's order (no peer or pool exists yet).
  stop_.store(true);
  wake_progress();
  progress_.join();
  if (wake_fd_ >= 0) close(wake_fd_);
  transport_->shutdown();
  transport_->deregister_memory(signal_key_);
  KVXFER_THROW(InvalidArgument, "KVXFER_PROGRESS_CPUS='" << v << "': " << why
                                                          << "; use inherit, all, or CPUs like 2,3 or 4-7");
}

Agent::~Agent() {
  {
    std::lock_guard<std::mutex> lock(g_agents_mu);
    agents_in_this_process().erase(info_.epoch);
  }
  say_goodbye(std::chrono::milliseconds(250));
  stop_.store(true);
  wake_progress();
  if (progress_.joinable()) progress_.join();
  cma_workers_.reset();  // finishes the parts in progress, drops the rest; their wake-ups need wake_fd_ open
  if (wake_fd_ >= 0) close(wake_fd_);
  std::lock_guard<std::mutex> lock(peers_mu_);
  for (auto& [epoch, peer] : peers_by_epoch_) {
    std::lock_guard<std::mutex> pl(peer->mu);
    for (auto& [id, s] : peer->live_sends) s->fail(ErrorKind::PeerLost, "the local agent was closed");
    for (auto& [id, r] : peer->live_recvs) r->fail(ErrorKind::PeerLost, "the local agent was closed");
  }
  // Writes already posted complete first (bounded): closing an rxm endpoint with RMA writes in flight crashed inside
  // libfabric (a core from the suite: ~Agent -> libfabric, right after a test whose sender was still writing).
  tell_agents_in_this_process(drain_posted_writes(std::chrono::seconds(2)));
  // Endpoints close next, while the op contexts, bounce slots and pools their pending operations point at are
  // alive (members are destroyed in reverse order, so contexts_ and the rings would otherwise go before transport_).
  transport_->shutdown();
  for (auto& [epoch, peer] : peers_by_epoch_) close_peer_keys(*peer);
  for (auto& peer : ended_associations_) close_peer_keys(*peer);
  for (auto& pool : pools_) {
    for (auto& key : pool->keys) transport_->deregister_memory(key);
    gpu::close_vmm_export(pool->vmm_exports);
  }
  transport_->deregister_memory(signal_key_);
  // A GPU copy into or out of the pinned rings may still run (a staged send, a landing) when we close: it ends
  // before the rings are freed.
  for (auto& q : copy_queues_)
    if (q) q->drain();
  staging_.reset();
  landing_.reset();
}

// Destructor, before our endpoints close: an Agent of this process that peers us must stop using our address now.
// libfabric's shm provider reaches a peer endpoint of the same process through that endpoint's own mapping of its
// region, which closing it unmaps: the other agent, still unaware of our BYE, posted to it (its own close's BYE, a
// heartbeat) and crashed in libfabric (SIGSEGV in the peer region's lock; a core from
// test_same_peer_added_from_many_threads_at_once_is_one_peer[fi_shm], 1 run in ~15 under CPU load).
// peers_mu_ held by the destructor.
void Agent::tell_agents_in_this_process(bool writes_over) {
  std::lock_guard<std::mutex> lock(g_agents_mu);
  std::set<uint64_t> epochs;
  for (const auto& [epoch, peer] : peers_by_epoch_) epochs.insert(epoch);
  for (const auto& peer : ended_associations_) epochs.insert(peer->info.epoch);
  for (uint64_t epoch : epochs) {
    auto it = agents_in_this_process().find(epoch);
    if (it != agents_in_this_process().end() && it->second != this)
      it->second->peer_closing_in_this_process(info_.epoch, writes_over);
  }
}

// A BYE to `peer` saying why (ByeReason, in the message's xfer_id).
Agent::Command Agent::bye_command(const std::shared_ptr<PeerState>& peer, ByeReason reason) {
  Command c{Command::Kind::Control, nullptr, 0, peer, {}};
  c.msg.type = static_cast<uint8_t>(ControlType::Bye);
  c.msg.xfer_id = reason;
  return c;
}

// Destructor only: tells every connected peer we are closing (BYE), so their transfers with us fail now with
// PeerLost naming the close instead of at their deadlines (a peer on another host has no other way to learn it
// until its writes fail), and how many writes each of our transfers posted (ABORT), so its blocks are known free
// once those are counted. Waits at most `limit` for the progress thread to hand it all over.
void Agent::say_goodbye(std::chrono::milliseconds limit) {
  bool any = false;
  {
    std::lock_guard<std::mutex> lock(peers_mu_);
    for (auto& [epoch, peer] : peers_by_epoch_) any = any || !peer->lost;
  }
  if (!any || !progress_.joinable()) return;
  post_command(Command{Command::Kind::Goodbye, nullptr, 0, nullptr, {}});
  const auto until = Clock::now() + limit;
  while (!goodbye_sent_.load(std::memory_order_acquire) && Clock::now() < until)
    std::this_thread::sleep_for(std::chrono::microseconds(200));
}

// Destructor only (the progress thread has stopped): polls until every op context is back or `limit` passed.
bool Agent::drain_posted_writes(std::chrono::milliseconds limit) {
  const auto until = Clock::now() + limit;
  Event events[64];
  while (free_contexts_.size() < contexts_.size() && Clock::now() < until) {
    size_t n = 0;
    try {
      n = transport_->poll(events, 64);
    } catch (const std::exception&) {
      break;
    }
    for (size_t i = 0; i < n; ++i) {
      const auto kind = events[i].kind;
      if (events[i].context && (kind == Event::Kind::WriteDone || kind == Event::Kind::SendDone ||
                                kind == Event::Kind::OpError))
        return_context(static_cast<OpContext*>(events[i].context));
    }
    if (n == 0) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  return free_contexts_.size() == contexts_.size();
}

std::vector<uint8_t> Agent::metadata() const {
  std::lock_guard<std::mutex> lock(pools_mu_);
  std::vector<uint8_t> keys = transport_->exported_keys();
  if (keys.empty()) return encode_agent_info(info_);
  AgentInfo with_keys = info_;
  with_keys.transport_keys = std::move(keys);
  return encode_agent_info(with_keys);
}

AgentStats Agent::stats() const {
  AgentStats s;
  s.writes_posted = counters_.writes_posted;
  s.imms_received = counters_.imms_received;
  s.eagain = counters_.eagain;
  s.dropped_messages = counters_.dropped_messages;
  s.unknown_imms = counters_.unknown_imms;
  s.slots_reclaimed = counters_.slots_reclaimed;
  s.sends_waited_for_slot = counters_.sends_waited_for_slot;
  s.peers_released = counters_.peers_released;
  s.peers_fenced = counters_.peers_fenced;
  s.heartbeats_sent = counters_.heartbeats_sent;
  s.peers_silent = counters_.peers_silent;
  s.slot_violations = counters_.slot_violations;
  s.idle_waits = counters_.idle_waits;
  s.cma_jobs = counters_.cma_jobs;
  s.gpu_layer_launches = counters_.gpu_layer_launches;
  s.ipc_pools_mapped = counters_.ipc_pools_mapped;
  s.aborts_deferred = counters_.aborts_deferred;
  s.doorbell_sent = counters_.doorbell_sent;
  s.doorbell_received = counters_.doorbell_received;
  s.doorbell_wakes = counters_.doorbell_wakes;
  s.landings = counters_.landings;
  s.landing_rejected = counters_.landing_rejected;
  s.landing_waits = counters_.landing_waits;
  s.imm_writes = counters_.imm_writes;
  s.rails = transport_->rail_stats();
  return s;
}

uint32_t Agent::register_pool(const std::string& name, const LayoutSpec& layout,
                              const std::vector<LocalRegion>& regions) {
  KVXFER_CHECK(!regions.empty(), InvalidArgument, "pool '" << name << "' has no memory regions");
  const bool on_gpu = regions.front().device >= 0;
  std::vector<uint64_t> sizes;
  std::vector<gpu::DeviceRange> ranges;
  struct CloseExportsUnlessKept {  // VMM handles exported for a pool that then fails to register
    std::vector<gpu::DeviceRange>& ranges;
    bool keep = false;
    ~CloseExportsUnlessKept() {
      if (!keep)
        for (const auto& r : ranges) gpu::close_vmm_export(r.vmm);
    }
  } exports{ranges};
  for (const auto& r : regions) {
    const std::string what = "pool '" + name + "' region " + std::to_string(sizes.size());
    KVXFER_CHECK(r.addr != 0 && r.nbytes > 0, InvalidArgument, "pool '" << name << "': empty or null region");
    KVXFER_CHECK((r.device >= 0) == on_gpu && r.device == regions.front().device, InvalidArgument,
                 what << " is on " << (r.device < 0 ? "the host" : "cuda:" + std::to_string(r.device))
                      << " but region 0 is on "
                      << (on_gpu ? "cuda:" + std::to_string(regions.front().device) : "the host")
                      << "; register one pool per device");
    if (on_gpu) {
      const bool same_host_peers = wants_direct_path(options_.transport);
      ranges.push_back(gpu::describe_device_range(r.addr, r.nbytes, r.device, what, same_host_peers));
      // Refuse now what the same-host path could never share, rather than at the first transfer.
      KVXFER_CHECK(ranges.back().ipc_capable || ranges.back().vmm_capable || !same_host_peers, RegistrationFailed,
                   what << " is GPU memory that same-host peers cannot map: " << ranges.back().not_shareable
                        << ". Same-host peers reach GPU pools through CUDA IPC handles, or cuMem/VMM handles (POSIX "
                           "fd or fabric) for memory created with one, as PyTorch's expandable segments are. "
                           "Allocate the KV cache with cudaMalloc (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False), "
                           "or create the agent with transport='tcp'/'efa'/'verbs'");
    } else {
      check_host_range(r.addr, r.nbytes, what);
    }
    sizes.push_back(r.nbytes);
  }
  validate_layout(layout, sizes);
  std::lock_guard<std::mutex> domain(transport_mu_);  // registrations go to the transport's domain
  std::lock_guard<std::mutex> lock(pools_mu_);
  for (const auto& p : pools_)
    KVXFER_CHECK(p->name != name, InvalidArgument, "a pool named '" << name << "' is already registered");
  KVXFER_CHECK(printable_text(name) && name.size() <= 4096, InvalidArgument,
               "pool name " << quoted_text(name) << " must be printable text (no control characters) of at most 4096 "
                                                    "bytes: peers refuse metadata with other names");
  KVXFER_CHECK(pools_.size() < 64, InvalidArgument, "at most 64 pools per agent");
  auto pool = std::make_unique<LocalPool>();
  pool->name = name;
  pool->layout = layout;
  pool->regions = regions;
  pool->on_gpu = on_gpu;
  pool->device = on_gpu ? regions.front().device : -1;
  // GPU memory goes to the fabric only when the provider can register it (GPU-direct RDMA); otherwise the
  // staged path reads it, same-host peers reach it by CUDA IPC and others through our landing slots.
  const bool fabric_registers = !on_gpu || transport_->capabilities().hmem;
  if (on_gpu && fabric_registers && pool->device >= 0 && pool->device < 64 &&
      gpu::gpu_direct_writes_need_flush(pool->device))
    gpu_direct_flush_devices_.fetch_or(uint64_t{1} << pool->device, std::memory_order_acq_rel);
  pool->landing = !fabric_registers || options_.landing == "always";
  pool->landing_offered = !pool->landing && offers_landing(layout, on_gpu);
  if (pool->landing || pool->landing_offered) ensure_landing(on_gpu ? pool->device : -1);
  PoolInfo exposed{name, layout, {}, pool->landing, pool->landing_offered};
  for (size_t i = 0; i < regions.size(); ++i) {
    const uint64_t key = (static_cast<uint64_t>(pools_.size() + 1) << 16) | i;
    try {
      pool->keys.push_back(fabric_registers ? transport_->register_memory(reinterpret_cast<void*>(regions[i].addr),
                                                                          regions[i].nbytes, key, regions[i].device)
                                            : MemoryKey{});
    } catch (...) {
      for (auto& k : pool->keys) transport_->deregister_memory(k);
      throw;
    }
    // A landing pool is written only by our own copies: its key (if any) is not handed to peers.
    RemoteRegion rr{regions[i].addr, regions[i].nbytes, pool->landing ? 0 : pool->keys.back().rkey};
    if (on_gpu) {
      rr.device = regions[i].device;
      rr.pci_bus_id = gpu::pci_bus_id(regions[i].device);
      rr.has_ipc = ranges[i].ipc_capable;
      if (rr.has_ipc) rr.ipc_handle.assign(ranges[i].ipc.begin(), ranges[i].ipc.end());
      rr.ipc_offset = regions[i].addr - ranges[i].alloc_base;
      rr.has_vmm = ranges[i].vmm_capable;
      rr.vmm_pieces = ranges[i].vmm;
    }
    exposed.regions.push_back(std::move(rr));
  }
  if (!pool->landing)
    for (size_t i = 0; i < regions.size(); ++i)
      if (pool->keys[i].rkey)
        expose_to_peers(reinterpret_cast<void*>(regions[i].addr), regions[i].nbytes, pool->keys[i].rkey);
  for (auto& r : ranges) pool->vmm_exports.insert(pool->vmm_exports.end(), r.vmm.begin(), r.vmm.end());
  exports.keep = true;
  info_.pools.push_back(std::move(exposed));
  pools_.push_back(std::move(pool));
  return static_cast<uint32_t>(pools_.size() - 1);
}

namespace {
// A software fabric (tcp) pays per write: one 4 KiB write per chunk moved 0.20-0.32 of raw TCP here, packed into
// landing slots 0.59-0.65 (16 KiB chunks 0.55 -> 1.10; 32 KiB even). An RDMA NIC writes small chunks in hardware.
constexpr uint64_t kLandChunksBelow = 32u << 10;
// ... but a transfer whose layer is small goes in a few gathered writes anyway (iov_limit chunks each), and packing
// only adds its copies and the landing slots' round trip: 64 senders of 8 KiB layers into one receiver moved 0.61
// of the 1-peer rate packed, 1.25 direct (bench_many_peers); one layer of 16 x 4 KiB p50 183 us direct vs 204
// packed, 64 x 4 KiB 439 vs 343, 256 x 4 KiB 1272 vs 636; the demo's ~60 KiB layers gained (RESULTS.md).
constexpr uint64_t kLandLayersFrom = 32u << 10;
// Offered landing costs a ring of max_peers x landing_slots x landing_slot_bytes registered at the first such pool:
// not offered past this (the defaults: 32 MiB at 32 peers, 64 MiB at 64).
constexpr uint64_t kOfferLandingRingMax = 64u << 20;

bool software_fabric(const Capabilities& caps) { return caps.provider.rfind("tcp", 0) == 0; }
}  // namespace

// A host pool of small chunks on a tcp fabric offers landing slots: senders whose chunks are small too pack them.
bool Agent::offers_landing(const LayoutSpec& layout, bool on_gpu) const {
  const uint64_t ring = uint64_t{options_.max_peers} * options_.landing_slots * options_.landing_slot_bytes;
  return options_.landing == "auto" && !on_gpu && software_fabric(transport_->capabilities()) &&
         layout.chunk_bytes < kLandChunksBelow && ring <= kOfferLandingRingMax &&
         layout.chunk_bytes + kLandingDataOffset <= options_.landing_slot_bytes;
}

// Staged at both ends: our bounce slots, one fabric write per batch into the peer's landing slots, its copy into
// the pool. because: why this path (for a GPU pool, why CUDA IPC cannot reach it).
PathChoice Agent::landing_choice(const PeerState& peer, const PoolInfo& dst, const std::string& src_where,
                                 const std::string& slots, const std::string& because, PathChoice c) const {
  const bool dst_gpu = dst.regions.front().device >= 0;
  c.path = SendPath::Staged;
  c.landing = true;
  c.reason = "staged at both ends: " + src_where + " -> host bounce slots (" + slots + ") -> " +
             transport_->capabilities().provider + " write into the peer's landing slots (" +
             std::to_string(peer.info.landing_slots) + " x " + std::to_string(peer.info.landing_slot_bytes >> 10) +
             " KiB) -> copied into its " + (dst_gpu ? "GPU" : "host") + " pool there (" + because +
             "); one extra copy per byte at each end, pipelined with the writes";
  return c;
}

namespace {
// The pieces of a request's first run of tokens (plan.h token_runs): a whole chunk's when the block sizes agree.
std::vector<ChunkPiece> first_run_pieces(const LayoutSpec& src, const LayoutSpec& dst) {
  if (src.block_size == dst.block_size) return chunk_pieces(src, dst);
  const TokenRun r = token_runs(src.block_size, dst.block_size, std::max(src.block_size, dst.block_size)).front();
  return chunk_pieces(src, dst, r.src_row, r.dst_row, r.tokens);
}

// Pieces below this go through the bounce ring on a fabric (tcp, 1 KiB pieces: 0.40 -> 0.71 of the same bytes
// between equal ranks, benchmarks/RESULTS.md).
constexpr uint64_t kPackPiecesBelow = 4096;

// The largest piece a chunk moves as between pools of different TP ranks (or head orders); UINT64_MAX when
// chunks move whole, or when the pools cannot exchange blocks (send() then names the mismatch).
uint64_t largest_piece(const LayoutSpec& src, const LayoutSpec& dst) {
  if ((src.same_heads(dst) && src.block_size == dst.block_size) || !can_exchange(src, dst)) return UINT64_MAX;
  uint64_t largest = 0;
  for (const ChunkPiece& p : first_run_pieces(src, dst)) largest = std::max(largest, p.nbytes);
  return largest;
}
}  // namespace

PathChoice Agent::choose_path(const PeerState& peer, uint32_t src_pool, uint32_t dst_pool, uint64_t layer_bytes) const {
  const LocalPool* src;
  {
    std::lock_guard<std::mutex> lock(pools_mu_);
    KVXFER_CHECK(src_pool < pools_.size(), InvalidArgument, "no local pool with index " << src_pool);
    src = pools_[src_pool].get();
  }
  KVXFER_CHECK(dst_pool < peer.info.pools.size(), InvalidArgument,
               "peer '" << peer.info.name << "' has no pool with index " << dst_pool);
  const PoolInfo& dst = peer.info.pools[dst_pool];
  const auto& caps = transport_->capabilities();
  const bool dst_gpu = dst.regions.front().device >= 0;
  const bool src_readable = !src->on_gpu || src->keys.front().handle != nullptr;  // the fabric can read it
  const bool always_stage = options_.staging == "always";
  const std::string src_where = src->on_gpu ? "cuda:" + std::to_string(src->device) : "host memory";
  const std::string slots = std::to_string(options_.staging_slots) + " x " +
                            std::to_string(options_.staging_slot_bytes >> 10) + " KiB";
  PathChoice c;
  c.copy_device = src->on_gpu ? src->device : -1;
  if (dst_gpu) {
    std::string why_not_ipc;
    bool ipc_handles = true;
    for (const auto& r : dst.regions) ipc_handles &= r.has_ipc || r.has_vmm;
    if (!wants_direct_path(options_.transport)) why_not_ipc = "transport '" + options_.transport + "' was requested";
    else if (!peer.same_host) why_not_ipc = "the peer is on another host";
    else if (!ipc_handles) why_not_ipc = "the peer's pool exported no CUDA IPC or VMM handle";
    else if (!gpu::available(&why_not_ipc)) why_not_ipc = "this process has " + why_not_ipc;
    if (why_not_ipc.empty()) {
      const std::string& pci = dst.regions.front().pci_bus_id;
      const int dst_device = gpu::device_by_pci_bus_id(pci);
      if (c.copy_device < 0) c.copy_device = dst_device;
      if (dst_device < 0) {
        why_not_ipc = "GPU " + pci + " is not visible to this process (CUDA_VISIBLE_DEVICES?)";
      } else if (!gpu::can_access_peer(c.copy_device, dst_device)) {
        why_not_ipc = "cuda:" + std::to_string(c.copy_device) + " cannot reach GPU " + pci +
                      " peer to peer (no NVLink or PCIe P2P between them)";
      } else {
        c.path = SendPath::CudaIpc;
        c.reason = "cuda_ipc: the peer's pool on GPU " + pci + " is mapped with CUDA IPC; cuda:" +
                   std::to_string(c.copy_device) + " copies from " + src_where +
                   (src->on_gpu ? " (a gather kernel, or the copy engines: KVXFER_GPU_COPY)" : " on its copy engines") +
                   " (NVLink or PCIe peer-to-peer; no host copy, no network)";
        return c;
      }
    }
    if (dst.landing)
      return landing_choice(peer, dst, src_where, slots,
                            "no CUDA IPC: " + why_not_ipc + "; the fabric cannot write its GPU memory", c);
    bool dst_registered = true;
    for (const auto& r : dst.regions) dst_registered &= r.rkey != 0;
    KVXFER_CHECK(dst_registered && caps.hmem, TransportUnavailable,
                 "peer '" << peer.info.name << "' pool '" << dst.name << "' is GPU memory (cuda:"
                          << dst.regions.front().device << " on " << peer.info.hostname
                          << ") that no path reaches: not CUDA IPC (" << why_not_ipc << "), and provider "
                          << caps.provider << " cannot write GPU memory (no FI_HMEM GPU-direct RDMA). Register a "
                          << "host pool on the receiver, put both on one host, or use efa/verbs with GPU-direct RDMA");
    if (src_readable && !always_stage) {
      c.path = SendPath::Fabric;
      c.reason = "GPU-direct RDMA: " + caps.provider + " writes from " + src_where + " into the peer's GPU memory";
    } else {
      c.path = SendPath::Staged;
      c.reason = "staged: " + src_where + " -> pinned host bounce slots (" + slots + ") -> GPU-direct RDMA write over " +
                 caps.provider + "; one device-to-host copy per byte, pipelined with the writes";
    }
    return c;
  }
  if (dst.landing) return landing_choice(peer, dst, src_where, slots, "the peer asked for landing='always'", c);
  const bool cma = peer.path == "cma";
  if (always_stage || !src_readable || (src->on_gpu && cma)) {
    c.path = SendPath::Staged;
    c.staged_to_cma = cma;
    c.reason = "staged: " + src_where + " -> " + (src->on_gpu ? "pinned " : "") + "host bounce slots (" + slots +
               ") -> " + (cma ? "cma" : caps.provider) +
               (src->on_gpu ? "; one device-to-host copy per byte, pipelined with the writes"
                            : " (staging='always'; host memory could be written directly)");
    if (src->on_gpu && !cma) c.reason += "; provider " + caps.provider + " cannot read GPU memory (no FI_HMEM)";
    return c;
  }
  if (!cma && !src->on_gpu) {
    // Small pieces (a TP rank's heads of token-major chunks) would go a few per write (iov_limit); packed into
    // the bounce ring they leave as whole ranges of the receiver's chunks.
    const uint64_t piece = largest_piece(src->layout, dst.layout);
    if (piece < kPackPiecesBelow) {
      c.path = SendPath::Staged;
      c.reason = "staged: host memory -> host bounce slots (" + slots + ") -> " + caps.provider + ": the pools' " +
                 "chunks move as pieces of " + std::to_string(piece) + " bytes (KV heads of different TP ranks in " +
                 "token-major chunks), which " + caps.provider + " would write " + std::to_string(caps.max_iov) +
                 " at a time; packed, a write carries whole ranges of the receiver's chunks (one memcpy per byte)";
      return c;
    }
    // Small chunks (or pieces) to a pool that offers landing slots go packed, a batch per write, when this fabric
    // pays per write. Only ours are known here: the receiver offered because its own chunks are small.
    const uint64_t moves_as = std::min(piece, src->layout.chunk_bytes);
    if (dst.landing_offered && software_fabric(caps) && moves_as < kLandChunksBelow && layer_bytes >= kLandLayersFrom &&
        src->layout.chunk_bytes + kLandingDataOffset <= std::min(options_.staging_slot_bytes, peer.info.landing_slot_bytes))
      return landing_choice(peer, dst, src_where, slots,
                            "chunks of " + std::to_string(moves_as) + " bytes, which " + caps.provider +
                                " writes one per operation; packed, a write carries up to a landing slot of them", c);
  }
  c.path = cma ? SendPath::Cma : SendPath::Fabric;
  c.reason = src->on_gpu ? "GPU-direct RDMA: " + caps.provider + " reads cuda:" + std::to_string(src->device)
                         : peer.path + ": " + peer.path_reason;
  return c;
}

std::vector<uint64_t> Agent::staging_info() const {
  std::lock_guard<std::mutex> lock(staging_mu_);
  if (!staging_) return {0, 0, 0};
  return {staging_->slot_bytes(), staging_->num_slots(), staging_->pinned() ? 1u : 0u};
}

std::shared_ptr<PeerState> Agent::add_peer(const uint8_t* data, size_t nbytes) {
  AgentInfo peer_info = decode_agent_info(data, nbytes);
  KVXFER_CHECK(peer_info.epoch != info_.epoch, InvalidArgument, "an agent cannot add itself as a peer");
  KVXFER_CHECK(peer_info.transport == info_.transport, TransportUnavailable,
               "peer '" << peer_info.name << "' runs transport " << peer_info.transport << " but this agent runs "
                        << info_.transport << "; create both agents with the same transport");
  KVXFER_CHECK(peer_info.peer_keys == info_.peer_keys, TransportUnavailable,
               "peer '" << peer_info.name << "' " << (peer_info.peer_keys ? "gives" : "does not give")
                        << " each peer keys of its own but this agent " << (info_.peer_keys ? "does" : "does not")
                        << " (provider " << transport_->capabilities().provider
                        << "); set KVXFER_PEER_KEYS the same on both sides"
                        << (info_.transport == "ucx" ? " (ucx: keys of its own only where every write is a data AM: "
                                                       "KVXFER_UCX_WRITES=am on both, or UCX without RMA lanes)"
                                                     : " and run the same kvxfer and libfabric on both"));
  std::lock_guard<std::mutex> adding(add_peer_mu_);
  std::shared_ptr<PeerState> restarted;
  {
    std::lock_guard<std::mutex> lock(peers_mu_);
    auto it = peers_by_epoch_.find(peer_info.epoch);
    if (it != peers_by_epoch_.end() && !it->second->lost) return it->second;  // idempotent
    for (auto& [epoch, p] : peers_by_epoch_)
      if (p->info.name == peer_info.name && p->info.hostname == peer_info.hostname && !p->lost) restarted = p;
  }
  if (restarted) {
    // A new incarnation under the same name: the old one's transfers can never complete. It is ended like a removed
    // peer (it may still run); its recvs' writes_over settles on this host once its process is gone, elsewhere once
    // its keys are closed (per-peer keys) or at once (shared keys: the successor is taken as the evidence), on the
    // progress thread, which drains GPU landing copies first.
    {
      std::lock_guard<std::mutex> lock(restarted->mu);
      restarted->settle_removed_now = !restarted->same_host && !transport_->capabilities().fences_peers;
    }
    end_live_peer(restarted, ErrorKind::PeerRestarted,
                  "peer '" + peer_info.name + "' restarted (new epoch); its transfers were abandoned");
  }

  auto peer = std::make_shared<PeerState>();
  peer->info = std::move(peer_info);
  if (++links_made_ == 0) ++links_made_;  // never 0 ("not known")
  peer->link = links_made_;
  peer->landing_busy.assign(peer->info.landing_slots, 0);
  for (uint32_t i = peer->info.landing_slots; i-- > 0;) peer->landing_free.push_back(i);
  peer->same_host = peer->info.boot_id == info_.boot_id && peer->info.hostname == info_.hostname;
  if (peer->same_host) peer->pidfd = open_pidfd(static_cast<pid_t>(peer->info.pid));
  const bool want_cma = wants_direct_path(options_.transport);
  peer->path = transport_->capabilities().name;
  if (want_cma) {
    std::string why = "peer is on another host";
    if (peer->same_host &&
        cma_probe(static_cast<pid_t>(peer->info.pid), peer->info.cma_probe_addr, peer->info.cma_probe_cookie, &why)) {
      peer->path = "cma";
      why = "same host, CMA probe succeeded";
    }
    peer->path_reason = why;
    KVXFER_CHECK(peer->path == "cma" || options_.transport != "cma", TransportUnavailable,
                 "transport 'cma' cannot reach peer '" << peer->info.name << "': " << why);
  } else {
    peer->path_reason = "transport '" + options_.transport + "' requested";
  }
  if (want_cma) open_doorbell(*peer);
  else peer->signals_reason = "fabric: transport '" + options_.transport + "' requested";
  {
    std::lock_guard<std::mutex> domain(transport_mu_);
    peer->addr = transport_->insert_peer(peer->info.fabric_address);
  }
  try {
    admit_peer(peer);
  } catch (...) {
    forget_refused_peer(peer);
    throw;
  }
  Command c{Command::Kind::Control, nullptr, 0, peer, {}};
  c.msg.type = static_cast<uint8_t>(ControlType::Hello);
  c.msg.slot = peer->rx_window * window_slots_;
  post_command(std::move(c));
  return peer;
}

// add_peer once the transport knows the peer: its keys, lanes and rails, IPC mappings, a window, its own keys.
// Throws (malformed keys, no free window, a key collision) with the peer neither listed nor keyed.
void Agent::admit_peer(const std::shared_ptr<PeerState>& peer) {
  {
    std::lock_guard<std::mutex> domain(transport_mu_);
    transport_->import_keys(peer->addr, peer->info.transport_keys);
    if (std::string lanes = transport_->describe_peer(peer->addr); !lanes.empty()) peer->path_reason += "; " + lanes;
    peer->rails = std::max<uint32_t>(1, transport_->peer_rails(peer->addr));
  }
  premap_ipc_pools(*peer);
  {
    // transport_mu_ first (the progress thread's order): an early HELLO's link tells the transport our keys.
    std::lock_guard<std::mutex> domain(transport_mu_);
    std::lock_guard<std::mutex> lock(peers_mu_);
    // A restarted peer's old state stays listed, lost, like a removed one: its BYE still goes out and the progress
    // thread settles its ended recvs (settle_removed_recvs); its window is reused once no live peer holds the rest.
    peer->rx_window = assign_window(peer);
    auto& listed = peers_by_epoch_[peer->info.epoch];
    if (listed) ended_associations_.push_back(std::move(listed));  // the same incarnation added again: it was lost
    listed = peer;
    auto early = early_hellos_.find(peer->info.epoch);
    if (early != early_hellos_.end()) {
      if (early->second.window) {
        std::lock_guard<std::mutex> pl(peer->mu);
        peer->take_window(early->second.window_base, early->second.window_slots);
      }
      peer->hello_rails = early->second.rails;
      learn_peer_link(*peer, early->second.link);
      peer->connected = peer->hello_rails == (1u << peer->rails) - 1;
      early_hellos_.erase(early);
    }
  }
  if (transport_->capabilities().fences_peers) {  // once nothing can refuse the peer, before our HELLO lets it write
    std::lock_guard<std::mutex> domain(transport_mu_);
    if (!peer->transport_released) {  // (lost and released already, in the meantime: it gets none)
      try {
        open_peer_keys(*peer);
      } catch (...) {
        close_peer_keys(*peer);
        throw;
      }
      keyed_peers_.push_back(peer);
    }
  }
}

// A peer add_peer refused after the transport took it: unlisted, its window free again, its transport entry
// (address vector entry, UCX endpoint) removed, so refusals leave nothing behind.
void Agent::forget_refused_peer(const std::shared_ptr<PeerState>& peer) {
  {
    std::lock_guard<std::mutex> lock(peers_mu_);
    auto it = peers_by_epoch_.find(peer->info.epoch);
    if (it != peers_by_epoch_.end() && it->second == peer) {
      peers_by_epoch_.erase(it);
      if (window_owner_[peer->rx_window].lock() == peer) window_owner_[peer->rx_window].reset();
    }
  }
  std::lock_guard<std::mutex> domain(transport_mu_);
  if (!peer->transport_released) transport_->remove_peer(peer->addr);
  peer->transport_released = true;
  peer->doorbell.reset();
}

// Memory a peer may write into: every peer with keys gets one for it now, later peers when they are added.
void Agent::expose_to_peers(void* addr, size_t nbytes, uint64_t base_key) {
  if (!transport_->capabilities().fences_peers) return;
  remote_windows_.push_back({addr, nbytes, base_key});
  for (auto& w : keyed_peers_)  // released peers left the list (close_peer_keys)
    if (auto peer = w.lock()) open_peer_keys(*peer);
}

// Keys are derived (peer_key), not exchanged: the peer computes the same ones from what we published, its epoch and
// the link number of this association, which our HELLO tells it (learn_peer_link on its side).
void Agent::open_peer_keys(PeerState& peer) {
  const uint64_t salt = writer_salt(peer.info.epoch, peer.link);
  while (peer.keys.size() < remote_windows_.size()) {
    const RemoteWindow& w = remote_windows_[peer.keys.size()];
    peer.keys.push_back(transport_->register_peer_key(w.addr, w.nbytes, peer_key(w.base_key, salt)));
  }
}

// The peer's number for this association (its HELLO): ours to address it with, and with per-peer keys the salt of
// the keys we write into it with (open_peer_keys on its side). peers_mu_ and transport_mu_ held.
void Agent::learn_peer_link(PeerState& peer, uint32_t link) {
  peer.peer_link = link;
  if (!peer.info.peer_keys) return;
  peer.write_salt = writer_salt(info_.epoch, link);
  transport_->set_write_salt(peer.addr, peer.write_salt);
}

void Agent::close_peer_keys(PeerState& peer) {
  for (auto& k : peer.keys) transport_->deregister_memory(k);
  peer.keys.clear();
  keyed_peers_.erase(std::remove_if(keyed_peers_.begin(), keyed_peers_.end(),
                                    [&](const std::weak_ptr<PeerState>& w) {
                                      auto p = w.lock();
                                      return !p || p.get() == &peer;
                                    }),
                     keyed_peers_.end());
}

// Signals and control messages to a same-host peer go through its doorbell rings when we can map them.
void Agent::open_doorbell(PeerState& peer) {
  std::string why;
  if (!peer.same_host) why = "the peer is on another host";
  else if (peer.path != "cma") why = "no CMA access to the peer's process (" + peer.path_reason + ")";
  else if (!options_.doorbell) why = "doorbell disabled here (doorbell=False / KVXFER_DOORBELL=0)";
  else if (peer.info.doorbell_fd < 0) why = "the peer exposes no doorbell (disabled there, or its memfd failed)";
  else peer.doorbell = DoorbellLink::open(static_cast<pid_t>(peer.info.pid), peer.info.doorbell_fd, peer.info.wake_fd,
                                          &counters_.doorbell_wakes, &why);
  peer.signals_reason = peer.doorbell ? "doorbell: shared-memory rings (same host)" : "fabric: " + why;
}

// A free window of slots for a new peer: never used, or left by a peer that is gone (lost or replaced), so a late
// immediate of a live peer is never counted for another one.
uint32_t Agent::assign_window(const std::shared_ptr<PeerState>& peer) {
  for (uint32_t pass = 0; pass < 2; ++pass) {
    for (uint32_t w = 0; w < options_.max_peers; ++w) {
      auto owner = window_owner_[w].lock();
      if (owner && (pass == 0 || !owner->lost)) continue;
      window_owner_[w] = peer;
      return w;
    }
  }
  KVXFER_THROW(InvalidArgument, "this agent already has " << options_.max_peers << " live peers, the most it can hold "
                                << "(max_peers=" << options_.max_peers << "); remove peers it no longer uses, or "
                                << "create it with a larger max_peers (Agent(max_peers=...) or KVXFER_MAX_PEERS; "
                                << "each peer then gets " << ImmCode::kMaxSlots << " / max_peers transfers in flight)");
}

void Agent::remove_peer(const std::shared_ptr<PeerState>& peer, double drain_s) {
  if (peer->lost) return;
  const std::string why = "peer '" + peer->info.name + "' was removed";
  if (drain_s > 0) drain_peer(peer, drain_s, why);
  end_live_peer(peer, ErrorKind::PeerUnknown, why);
}

void Agent::refuse_peer(const std::shared_ptr<PeerState>& peer, const std::string& why) {
  if (peer->lost) return;
  end_live_peer(peer, ErrorKind::PeerUnknown, "peer '" + peer->info.name + "' was refused: " + why, kByeRefused);
}

// Ends every transfer with a live peer through the peer itself (CANCEL for our recvs, ABORT for our sends), whose
// answers say when nothing more can land: unlike the BYE, this settles writes_over for a peer on another host.
void Agent::drain_peer(const std::shared_ptr<PeerState>& peer, double drain_s, const std::string& why) {
  std::vector<std::shared_ptr<RecvState>> recvs;
  std::vector<std::shared_ptr<SendState>> sends;
  {
    std::lock_guard<std::mutex> lock(peer->mu);
    recvs = peer->unsettled_recvs();
    for (auto& [id, s] : peer->live_sends) sends.push_back(s);
    for (auto& [slot, s] : peer->quarantined) sends.push_back(s);
  }
  for (auto& r : recvs) cancel_recv(peer, r, why);
  for (auto& s : sends) abort_send(s, why);
  const auto deadline = Clock::now() + std::chrono::duration<double>(drain_s);
  auto over = [&] {
    for (auto& r : recvs)
      if (!r->writes_over && r->state() != TransferState::Done) return false;
    for (auto& s : sends)
      if (!s->writes_over) return false;
    return true;
  };
  while (!over() && !peer->lost && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::microseconds(500));
}

// Ends a peer whose process may still run, on the progress thread (end_peer_now), and returns once it is lost: the
// caller's transfers with it have failed. The progress thread sends the ABORTs with our totals and the BYE after
// them, so a live peer settles its recvs from us by counting, fails its sends to us and answers with their totals.
// Should the progress thread not get to it in time (it never stalls that long), the peer is ended here, with a BYE
// that carries no totals (settled as before: when its process is seen gone).
void Agent::end_live_peer(const std::shared_ptr<PeerState>& peer, ErrorKind kind, const std::string& why,
                          ByeReason reason) {
  if (progress_.joinable() && std::this_thread::get_id() == progress_.get_id()) {
    end_peer_now(peer, kind, why, reason);
    return;
  }
  if (progress_.joinable() && !stop_.load()) {
    Command c{Command::Kind::EndPeer, nullptr, static_cast<uint32_t>(kind), peer, {}};
    c.msg.xfer_id = reason;
    c.reason = why;
    post_command(std::move(c));
    const auto until = Clock::now() + std::chrono::seconds(2);
    while (!peer->lost && Clock::now() < until) std::this_thread::sleep_for(std::chrono::microseconds(50));
    if (peer->lost) return;
  }
  post_command(bye_command(peer, reason));
  mark_peer_lost(*peer, kind, why, /*writes_over_now=*/false);
}

namespace {

// Polls until ready(), or throws PeerLost when the peer is lost and TransferTimeout (naming `what` the peer failed
// to do) after timeout_s.
template <typename Ready>
void wait_for_peer(const PeerState& peer, double timeout_s, const char* what, std::chrono::microseconds poll,
                   Ready ready) {
  const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s));
  while (!ready()) {
    KVXFER_CHECK(!peer.lost, PeerLost, "peer '" << peer.info.name << "' is lost: " << peer.lost_reason);
    KVXFER_CHECK(Clock::now() < until, TransferTimeout,
                 "peer '" << peer.info.name << "' " << what << " within " << timeout_s
                          << " s; it must add this agent's metadata too (agent.add_peer) and be running");
    std::this_thread::sleep_for(poll);
  }
}

}  // namespace

// A send needs a slot from the window the receiver names in its HELLO: the first send to a new peer may wait for
// that handshake (one round trip, once per peer).
void Agent::wait_for_window(PeerState& peer, double timeout_s) {
  wait_for_peer(peer, timeout_s, "did not complete its handshake", std::chrono::microseconds(100), [&] {
    std::lock_guard<std::mutex> lock(peer.mu);
    return peer.have_window;
  });
}

void Agent::wait_connected(const std::shared_ptr<PeerState>& peer, double timeout_s) {
  wait_for_peer(*peer, timeout_s, "did not answer", std::chrono::microseconds(200), [&] { return peer->connected.load(); });
}

// What a send between pools of different TP ranks (or head orders) costs, for Send.path_reason: nothing is said
// when chunks move whole.
namespace {
std::string pieces_note(const LayoutSpec& src, const LayoutSpec& dst) {
  const bool same_blocks = src.block_size == dst.block_size;
  if (src.same_heads(dst) && same_blocks) return "";
  const std::vector<ChunkPiece> pieces = first_run_pieces(src, dst);
  std::ostringstream os;
  if (!same_blocks)
    os << "; blocks of " << src.block_size << " tokens land in blocks of " << dst.block_size
       << " (a run of tokens inside one block on each side moves as " << pieces.size()
       << (pieces.size() == 1 ? " piece)" : " pieces)");
  if (src.same_heads(dst)) return os.str();
  os << "; KV heads [" << std::max(src.head_begin, dst.head_begin) << ", " << std::min(src.head_end(), dst.head_end())
     << ") of each chunk move as " << pieces.size() << (pieces.size() == 1 ? " piece" : " pieces") << " of "
     << pieces[0].nbytes << " bytes";
  if (pieces.size() > 1 && src.head_major != dst.head_major)
    os << " (one pool's chunks are token-major, the other's head-major: one piece per row)";
  else if (pieces.size() > 1)
    os << " (token-major chunks: a head-major (HND) layout on both sides moves one piece per chunk)";
  return os.str();
}
}  // namespace

std::shared_ptr<SendState> Agent::send(const std::shared_ptr<PeerState>& peer, uint64_t xfer_id, uint32_t src_pool,
                                       const std::string& dst_pool, const int32_t* src_ids, size_t n_src,
                                       const int32_t* dst_ids, size_t n_dst, uint32_t num_tokens, int first_layer,
                                       int num_layers, double timeout_s) {
  KVXFER_CHECK(!peer->lost, PeerLost, "peer '" << peer->info.name << "' is lost: " << peer->lost_reason);
  const LocalPool* src = nullptr;
  {
    std::lock_guard<std::mutex> lock(pools_mu_);
    KVXFER_CHECK(src_pool < pools_.size(), InvalidArgument, "no local pool with index " << src_pool);
    src = pools_[src_pool].get();
  }
  const uint32_t dst_index = peer_pool_index(*peer, dst_pool);
  const PoolInfo& dst = peer->info.pools[dst_index];
  const uint32_t first = first_layer < 0 ? 0 : static_cast<uint32_t>(first_layer);
  const uint32_t count = num_layers < 0 ? (first < src->layout.num_layers ? src->layout.num_layers - first : 0)
                                        : static_cast<uint32_t>(num_layers);
  // What a layer moves: whole chunks, or the heads both pools hold (at most the smaller chunk) between TP ranks.
  const uint64_t layer_bytes = n_src * src->layout.num_planes * std::min(src->layout.chunk_bytes, dst.layout.chunk_bytes);
  const PathChoice choice = choose_path(*peer, src_pool, dst_index, layer_bytes);
  uint64_t max_write = transport_->capabilities().max_write_bytes;
  if (choice.path == SendPath::Cma || choice.path == SendPath::CudaIpc) max_write = 64ull << 20;
  uint64_t batch_bytes = 0;
  if (choice.path == SendPath::Staged) {
    ensure_staging(src->on_gpu ? src->device : -1);  // host sources fill the slots with memcpy: no GPU needed
    const uint64_t slot = options_.staging_slot_bytes;
    KVXFER_CHECK(src->layout.chunk_bytes <= slot, InvalidArgument,
                 "a chunk of pool '" << src->name << "' is " << src->layout.chunk_bytes << " bytes, larger than a "
                                     << slot << "-byte staging slot; create the agent with a larger staging_slot_bytes");
    max_write = choice.staged_to_cma ? slot : std::min<uint64_t>(slot, max_write);
    if (choice.landing) {
      // A batch is one write of header + data into one landing slot of the peer.
      const uint64_t fits = std::min<uint64_t>({slot, peer->info.landing_slot_bytes,
                                                transport_->capabilities().max_write_bytes});
      max_write = fits > kLandingDataOffset ? fits - kLandingDataOffset : 0;
      KVXFER_CHECK(src->layout.chunk_bytes <= max_write, InvalidArgument,
                   "a chunk of pool '" << src->name << "' is " << src->layout.chunk_bytes << " bytes, more than the "
                                       << max_write << " data bytes a landing batch carries (staging slots of " << slot
                                       << " bytes, peer '" << peer->info.name << "' landing slots of "
                                       << peer->info.landing_slot_bytes
                                       << "); raise staging_slot_bytes here or landing_slot_bytes on the peer");
    }
    batch_bytes = max_write;
  }
  WritePlan plan = build_plan(src->layout, dst.layout, src_ids, n_src, dst_ids, n_dst, num_tokens, first, count,
                              max_write);

  auto send = std::make_shared<SendState>(xfer_id, std::move(plan), timeout_s > 0 ? timeout_s : options_.default_timeout_s);
  send->set_end_signal(ends_);
  send->peer = peer;
  send->src_pool = src_pool;
  send->src = src;
  send->dst_pool = dst_index;
  send->path = choice.path;
  send->path_reason = choice.reason + pieces_note(src->layout, dst.layout);
  send->staged_to_cma = choice.staged_to_cma;
  send->landing = choice.landing;
  send->batch_bytes = batch_bytes;
  send->copy_device = choice.copy_device;
  send->marked.reset(new std::atomic<uint8_t>[count]);
  for (uint32_t i = 0; i < count; ++i) send->marked[i].store(0, std::memory_order_relaxed);
  if (choice.path == SendPath::CudaIpc) open_ipc_mappings(*peer, *send, dst_index);
  const uint32_t signals_per_layer = (send->plan.granules_per_layer + ImmCode::kMaxGranules - 1) / ImmCode::kMaxGranules;
  switch (choice.path) {
    case SendPath::Cma:
    case SendPath::CudaIpc: send->ops_expected = static_cast<uint64_t>(signals_per_layer) * count; break;
    case SendPath::Staged: send->ops_expected = count_staged_ops(*send); break;
    case SendPath::Fabric:
      send->ops_expected = count_gathered_writes(send->plan, transport_->capabilities().max_iov);
      break;
  }
  wait_for_window(*peer, timeout_s > 0 ? timeout_s : options_.default_timeout_s);
  {
    std::lock_guard<std::mutex> lock(peer->mu);
    // Again, under the lock mark_peer_lost ends a peer's transfers with: lost since the check above (a BYE read
    // meanwhile), the peer's sends were already collected and failed, and this one would wait out its deadline.
    KVXFER_CHECK(!peer->lost, PeerLost, "peer '" << peer->info.name << "' is lost: " << peer->lost_reason);
    KVXFER_CHECK(!peer->live_sends.count(xfer_id), DuplicateTransfer,
                 "transfer id " << xfer_id << " is already live towards peer '" << peer->info.name
                                << "'; ids are the engine's request keys and must be unique per peer while live");
    KVXFER_CHECK(!peer->cancelled_ids.count(xfer_id), Cancelled,
                 "transfer " << xfer_id << " to peer '" << peer->info.name
                             << "' was cancelled by the receiver (its Recv.cancel) before it was sent; nothing was "
                                "written: drop the request here");
    peer->live_sends[xfer_id] = send;
    if (peer->free_slots.empty() || !peer->slot_waiters.empty()) {
      // Every slot of the window is in flight: wait, in call order, for one to come back (RELEASE, ABORT_ACK).
      // The deadline runs meanwhile; layers marked ready are posted once the send has its slot.
      send->waiting_for_slot = true;
      peer->slot_waiters.push_back(send);
      counters_.sends_waited_for_slot++;
      return send;
    }
    peer->take_slot(send);
  }
  post_command(Command{Command::Kind::NewSend, send, 0, nullptr, {}});
  return send;
}

void Agent::abort_send(const std::shared_ptr<SendState>& send, const std::string& why) {
  if (send->state() != TransferState::Pending) return;
  Command c{Command::Kind::AbortSend, send, 0, nullptr, {}};
  c.reason = why;
  post_command(std::move(c));
}

void Agent::cancel_recv(const std::shared_ptr<PeerState>& peer, const std::shared_ptr<RecvState>& recv,
                        const std::string& why) {
  if (recv->state() == TransferState::Done || recv->writes_over) return;
  recv->fail(ErrorKind::Cancelled, "transfer " + std::to_string(recv->xfer_id) + " from peer '" + peer->info.name +
                                       "' was cancelled by this receiver: " + why +
                                       "; free its blocks once writes_over is true");
  Command c{Command::Kind::CancelRecv, nullptr, 0, peer, {}};
  c.recv = recv;  // the CANCEL itself carries only the id: the reason stays in this recv's error
  post_command(std::move(c));
}

void Agent::layer_ready(const std::shared_ptr<SendState>& send, int layer) {
  if (send->state() == TransferState::Failed)
    throw Error(send->error_kind(), "transfer " + std::to_string(send->xfer_id) + " already failed: " + send->error());
  std::vector<Command> cmds;
  auto mark = [&](uint32_t i) {
    if (send->marked[i].exchange(1) == 0) cmds.push_back(Command{Command::Kind::LayerReady, send, i, nullptr, {}});
    else if (layer >= 0)
      KVXFER_THROW(InvalidArgument, "layer " << layer << " of transfer " << send->xfer_id << " is already marked ready");
  };
  if (layer < 0) {
    for (uint32_t i = 0; i < send->num_layers; ++i) mark(i);
  } else {
    const uint32_t l = static_cast<uint32_t>(layer);
    KVXFER_CHECK(l >= send->first_layer && l < send->first_layer + send->num_layers, InvalidArgument,
                 "layer " << layer << " is not part of transfer " << send->xfer_id << " (layers " << send->first_layer
                          << ".." << send->first_layer + send->num_layers - 1 << ")");
    mark(l - send->first_layer);
  }
  if (!cmds.empty()) post_commands(std::move(cmds));
}

// The index of the peer's pool named `name` (empty: its first). Throws PeerUnknown naming the pools it has.
uint32_t Agent::peer_pool_index(const PeerState& peer, const std::string& name) {
  std::string names;
  for (uint32_t i = 0; i < peer.info.pools.size(); ++i) {
    if (name.empty() || peer.info.pools[i].name == name) return i;
    names += (names.empty() ? "" : ", ") + peer.info.pools[i].name;
  }
  KVXFER_THROW(PeerUnknown, "peer '" << peer.info.name << "' exposes no pool"
                                     << (name.empty() ? "" : " named '" + name + "'") << " (it exposes: "
                                     << (names.empty() ? "none" : names)
                                     << "); register the pool before taking its metadata");
}

// The granules a recv of dst_ids from this peer's pool src_pool (empty: its first) counts per layer: the pieces
// build_plan cuts between the two layouts (plan.h). Pools that cannot exchange blocks are counted as equal ones
// here; the sender's send() refuses them with the LayoutMismatch that names the field.
uint32_t Agent::granules_from(const PeerState& peer, const std::string& src_pool, const LayoutSpec& dst,
                              const int32_t* dst_ids, size_t n, uint32_t num_tokens) const {
  const std::vector<PoolInfo>& pools = peer.info.pools;
  const PoolInfo* src = src_pool.empty() && pools.empty() ? nullptr : &pools[peer_pool_index(peer, src_pool)];
  const bool known = src && can_exchange(src->layout, dst);
  return expected_granules(known ? src->layout : dst, dst, dst_ids, n, num_tokens);
}

std::shared_ptr<RecvState> Agent::recv(const std::shared_ptr<PeerState>& peer, uint64_t xfer_id, uint32_t dst_pool,
                                       const int32_t* dst_ids, size_t num_ids, int first_layer, int num_layers,
                                       double timeout_s, const std::string& src_pool, uint32_t num_tokens) {
  KVXFER_CHECK(!peer->lost, PeerLost, "peer '" << peer->info.name << "' is lost: " << peer->lost_reason);
  LayoutSpec layout;
  {
    std::lock_guard<std::mutex> lock(pools_mu_);
    KVXFER_CHECK(dst_pool < pools_.size(), InvalidArgument, "no local pool with index " << dst_pool);
    layout = pools_[dst_pool]->layout;
  }
  const uint32_t granules = granules_from(*peer, src_pool, layout, dst_ids, num_ids, num_tokens);
  const uint32_t first = first_layer < 0 ? 0 : static_cast<uint32_t>(first_layer);
  const uint32_t count = num_layers < 0 ? (first < layout.num_layers ? layout.num_layers - first : 0)
                                        : static_cast<uint32_t>(num_layers);
  KVXFER_CHECK(count >= 1 && first < layout.num_layers && count <= layout.num_layers - first, InvalidArgument,
               "layer range [" << first << ", " << first + count << ") is outside the pool's " << layout.num_layers
                               << " layers");
  auto recv = std::make_shared<RecvState>(xfer_id, first, count, granules,
                                          timeout_s > 0 ? timeout_s : options_.default_timeout_s);
  recv->set_end_signal(ends_);
  std::lock_guard<std::mutex> lock(peer->mu);
  // Again under the lock, as in send(): a recv listed after mark_peer_lost collected them would never be failed.
  KVXFER_CHECK(!peer->lost, PeerLost, "peer '" << peer->info.name << "' is lost: " << peer->lost_reason);
  KVXFER_CHECK(!peer->live_recvs.count(xfer_id), DuplicateTransfer,
               "transfer id " << xfer_id << " from peer '" << peer->info.name << "' already has a live recv");
  auto mismatch = [&](uint32_t f, uint32_t n, uint32_t g) {
    return f != first || n != count || g != granules;
  };
  auto describe = [&](uint32_t f, uint32_t n, uint32_t g) {
    return describe_count_mismatch(f, n, g, first, count, granules);
  };
  if (auto it = peer->arrived.find(xfer_id); it != peer->arrived.end()) {
    const auto a = it->second;
    peer->arrived.erase(it);
    if (mismatch(a.first_layer, a.num_layers, a.granules_per_layer)) {
      recv->fail(ErrorKind::TransferFailed, describe(a.first_layer, a.num_layers, a.granules_per_layer));
    } else {
      for (uint32_t l = first; l < first + count; ++l) recv->mark_layer_done(l);
      recv->finish();
    }
    recv->writes_over = true;  // every granule was counted before we were asked
    return recv;
  }
  if (auto it = peer->abandoned.find(xfer_id); it != peer->abandoned.end()) {
    const uint32_t slot = it->second;
    peer->abandoned.erase(it);  // its order entry is dropped when it comes up for eviction
    recv->fail(ErrorKind::TransferFailed,
               "the sender abandoned transfer " + std::to_string(xfer_id) +
                   " before this recv was posted (it failed or timed out on the sending side); its blocks may be "
                   "partly written: free them once writes_over is true");
    SlotCounter& s = peer->slots[slot];
    if (s.aborted && s.xfer_id == xfer_id) s.watch(recv);  // writes still to count: told when the slot resets
    else recv->writes_over = true;
    return recv;
  }
  if (auto it = peer->slot_of_xfer.find(xfer_id); it != peer->slot_of_xfer.end()) {
    SlotCounter& s = peer->slots[it->second];
    s.watch(recv);
    if (mismatch(s.first_layer, s.num_layers, s.granules_per_layer)) {
      recv->fail(ErrorKind::TransferFailed, describe(s.first_layer, s.num_layers, s.granules_per_layer));
      return recv;
    }
    s.recv = recv;
    for (uint32_t l = first; l < first + count; ++l)
      if (s.counts[l] == granules) recv->mark_layer_done(l);
  } else {
    peer->waiting_recvs[xfer_id] = recv;
  }
  peer->live_recvs[xfer_id] = recv;
  return recv;
}

// Hands commands to the progress thread (which owns the transport and the counters) and wakes it.
void Agent::post_commands(std::vector<Command> cmds) {
  {
    std::lock_guard<std::mutex> lock(cmd_mu_);
    for (auto& c : cmds) commands_.push_back(std::move(c));
    has_commands_ = true;
  }
  wake_progress();
}

void Agent::post_command(Command c) {
  {
    std::lock_guard<std::mutex> lock(cmd_mu_);
    commands_.push_back(std::move(c));
    has_commands_ = true;
  }
  wake_progress();
}

void Agent::inject_imm(const std::shared_ptr<PeerState>& peer, uint32_t imm) {
  post_command(Command{Command::Kind::InjectImm, nullptr, imm, peer, {}});
}

void Agent::inject_landing(const std::shared_ptr<PeerState>& peer, uint32_t slot, uint32_t index,
                           std::vector<uint8_t> bytes) {
  Command c{Command::Kind::InjectLanding, nullptr, index, peer, {}};
  c.msg.slot = slot;
  c.bytes = std::move(bytes);
  post_command(std::move(c));
}

void Agent::inject_wire_message(std::vector<uint8_t> bytes) {
  Command c{Command::Kind::InjectMessage, nullptr, 0, nullptr, {}};
  c.bytes = std::move(bytes);
  c.wire = true;
  post_command(std::move(c));
}

void Agent::inject_begin(const std::shared_ptr<PeerState>& peer, uint64_t xfer_id, uint32_t slot, uint32_t first_layer,
                         uint32_t num_layers, uint32_t granules_per_layer) {
  Command c{Command::Kind::InjectMessage, nullptr, 0, peer, {}};
  c.msg.type = static_cast<uint8_t>(ControlType::Begin);
  c.msg.sender_epoch = peer->info.epoch;
  c.msg.receiver_epoch = info_.epoch;
  c.msg.xfer_id = xfer_id;
  c.msg.slot = slot;
  c.msg.first_layer = first_layer;
  c.msg.num_layers = num_layers;
  c.msg.granules_per_layer = granules_per_layer;
  post_command(std::move(c));
}

}  // namespace kvxfer
