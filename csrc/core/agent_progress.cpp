// Agent: the progress-thread half. Posts writes within a bounded window, polls completions, counts immediates,
// handles control messages and enforces deadlines and peer liveness. Never holds the GIL, never calls Python.
#include <pthread.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <sstream>

#include "core/agent.h"
#include "core/plan.h"
#include "signals/memory.h"
#include "transports/host_ipc/cma.h"

namespace kvxfer {

namespace {
// An idle agent keeps polling this long after its last activity before it blocks on its CQ fds: transfers often
// come in bursts (the next layer, the next request), and waking from a block costs more than a short spin.
constexpr auto kSpinBeforeBlock = std::chrono::microseconds(300);
// ... and this long while one of its sends still waits for layers to be marked (a forward in progress): waking it
// from the block costs the marking thread, whose write to the wake fd hands its CPU to the progress thread. Layer
// by layer behind a forward of 5 ms a layer on one host (kvxfer-compare --over host --layer-ms 5) that delayed the
// forward by 18-36 ms over 32 layers; polling instead, 4-5 ms.
constexpr auto kSpinWhileMarking = std::chrono::microseconds(5000);
// On ordered rails a rail's writes are counted by an immediate at least this often (besides a layer's end): the
// receiver's progress thread learns of data only through completions, and one that found none for a while blocked
// between writes (a wake-up per write) and, after 16 such wakes, took its CQ fd for stuck and slept 1 ms at a time
// (kvxfer-bench's p50 190 ms instead of 150, an immediate per layer). Keeping it polling while data flowed took the CPU
// an engine's own model needed (kvxfer-demo --quick, KV exposed 1.2-1.7% -> 3-4.7%). At 1 MiB (8 writes of 128 KiB)
// it keeps its completions, at 1/32 of one per write.
constexpr uint64_t kBytesPerRailSignal = uint64_t(1) << 20;
// Deadlines and peer liveness are checked this often while a transfer is live (deadlines are seconds), and every
// kIdleCheckMs otherwise: an idle agent woke 100 times a second for nothing, 2-5 ms of CPU per second each.
constexpr auto kLiveCheck = std::chrono::milliseconds(10);
constexpr int kIdleCheckMs = 100;
// Messages held back (a peer still connecting, a provider queue full) are retried this often while the agent
// otherwise sleeps: spinning on them cost a core for as long as a peer took to answer.
constexpr int kRetryHeldMs = 1;
// A wait fd that keeps waking the agent with nothing to do (UCX's, while a peer owes it a connection reply) is
// ignored after this many such wakes in a row over this long, until the loop finds work again: the agent then
// sleeps kRetryHeldMs at a time. Spinning on it cost a core, and on a 2-core machine starved the very peer it waited
// for. Between back-to-back transfers UCX's fd also wakes the agent for its own traffic: the time bound keeps those
// short gaps on the fd (with a count alone, a 1-block ucx transfer back to back took 0.28 ms instead of 0.13).
constexpr uint32_t kMaxIdleCqWakes = 16;
constexpr auto kIdleCqWakesFor = std::chrono::milliseconds(5);
constexpr size_t kArrivedMemory = 65536;    // completed-but-unclaimed transfers remembered per peer
constexpr size_t kCmaOpsPerStep = 1024;     // chunks copied per progress step before polling again
// Bytes one send may have posted on the fabric and not yet completed. Writes wait in the provider's queue in order,
// so whatever one send has queued delays every later send to that peer: a small request behind a 512 MiB one waited
// for most of it (the provider window allowed 1024 gathered writes, up to 128 MiB). 16 MiB is still several times
// what a loopback socket or a NIC keeps in flight (per rail: each rail is a connection of its own).
constexpr uint64_t kBytesInFlightPerSend = uint64_t(16) << 20;
constexpr size_t kCmaLayersInFlight = 4;    // layers of one send queued on the CMA workers at once
constexpr auto kReleaseLostPeerAfter = std::chrono::seconds(1);  // release_lost_peer's grace period
// ... and how long its BYE (and the ABORTs before it), and our writes posted to it, may wait to go out. A peer that
// died, or whose socket is full because it is stopped, never takes them: rxm keeps answering EAGAIN and the writes
// never complete. Past this it is released anyway: its connection closes, which completes those writes with errors
// (so our failed sends' writes_over turns True), and with per-peer keys its keys close and its ended recvs settle.
constexpr auto kFarewellGivesUpAfter = std::chrono::seconds(5);
bool farewell_given_up(PeerState& peer) {
  std::lock_guard<std::mutex> lock(peer.mu);
  return Clock::now() - peer.lost_at >= kFarewellGivesUpAfter;
}
// A BYE that ends a peer waits at most this long for the ABORTs deferred behind copies still running into it (the
// destructor gives its BYEs 250 ms in all); past it the BYE goes without kByeTotalsSent.
constexpr auto kByeWaitsForAborts = std::chrono::milliseconds(150);
// True when pid no longer runs: gone (ESRCH) or a zombie its parent has not reaped yet. kill(pid, 0) alone
// succeeds on a zombie, which left a dead, unreaped peer undetected until its transfers' deadlines.
bool process_gone(pid_t pid) {
  if (kill(pid, 0) != 0) return errno == ESRCH;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", static_cast<int>(pid));
  FILE* f = std::fopen(path, "r");
  if (!f) return false;  // another PID namespace or no procfs: keep relying on kill()
  char buf[512];
  const size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  buf[n] = 0;
  const char* close = std::strrchr(buf, ')');  // the command name may itself contain ')'
  return close && close[1] == ' ' && (close[2] == 'Z' || close[2] == 'X');
}

// Why transfers with a peer that ended us ended (its BYE, or the ABORTs before it), after "peer '<name>".
std::string ended_because(ByeReason reason) {
  switch (reason) {
    case kByeClosed: return "' closed its agent (Agent.close, or its process shut down); transfers with it ended";
    case kByeSilent:
      return "' heard nothing from this agent for its peer_timeout_s and ended transfers with it (was this process "
             "stopped or starved of CPU, or the network between cut?)";
    case kByeAnswer: return "' ended its transfers with this agent in answer to this agent ending it";
    case kByeRefused:
      return "' refused this agent as a peer: it would reach this host over TCP although it has an RDMA NIC "
             "(SlowFallback there: fix its RDMA provider, or accept TCP with KVXFER_FALLBACK=allow on it)";
    default:
      return "' removed this agent (its remove_peer, or it met a newer agent under this name); transfers with it ended";
  }
}

ByeReason bye_reason_of_abort(uint32_t code) {
  switch (code) {
    case kAbortClosing: return kByeClosed;
    case kAbortSilent: return kByeSilent;
    case kAbortAnswer: return kByeAnswer;
    default: return kByeRemoved;
  }
}

uint32_t abort_code_of(ByeReason reason) {
  switch (reason) {
    case kByeClosed: return kAbortClosing;
    case kByeSilent: return kAbortSilent;
    case kByeAnswer: return kAbortAnswer;
    default: return kAbortRemoved;
  }
}

}  // namespace

void Agent::progress_loop() {
  pthread_setname_np(pthread_self(), "kvxfer-progress");  // what top, gdb and /proc show for this thread
  // Its CUDA calls (event queries, copies, staging allocations) must not break a graph the model captures meanwhile.
  if (gpu::built_with_cuda()) gpu::relax_graph_capture_for_this_thread();
  defer_cuda_frees_on_this_thread();  // a DeviceCounter's words last held by a recv here: freed elsewhere
  uint32_t idle = 0;
  auto last_busy = Clock::now();
  while (!stop_.load(std::memory_order_relaxed)) {
    bool busy = false;
    try {
      std::lock_guard<std::mutex> domain(transport_mu_);
      busy |= run_commands();
      busy |= flush_control();
      if (!goodbye_pending_.empty()) busy |= queue_goodbyes();
      if (goodbye_queued_ && goodbye_pending_.empty() && std::none_of(outbox_.begin(), outbox_.end(), [](const auto& e) {
            return e.second.type == static_cast<uint8_t>(ControlType::Bye);
          }))
        goodbye_sent_.store(true, std::memory_order_release);
      busy |= post_pending_writes();
      busy |= flush_deferred_aborts();
      busy |= settle_draining();
      busy |= poll_completions();
      if (!pending_landings_.empty()) busy |= advance_landings();
    } catch (const std::exception& e) {
      // A failure we could not attribute to one transfer; keep the thread alive, the deadlines still hold.
      busy = false;
    }
    // Apart from the rest: a step above that throws on every turn (a GPU whose context failed) must not keep the
    // deadlines from failing the transfers it holds up.
    if (Clock::now() >= next_deadline_check_) {
      try {
        std::lock_guard<std::mutex> domain(transport_mu_);
        check_deadlines();
      } catch (const std::exception& e) {
      }
    }
    if (busy) {
      idle = 0;
      idle_cq_wakes_ = 0;
      last_busy = Clock::now();
      continue;
    }
    ++idle;
    if (woke_on_cq_) ++idle_cq_wakes_;
    woke_on_cq_ = false;
    // With a CQ wait fd, an agent with nothing to post blocks until a completion, a message or a command: an idle
    // agent then costs no CPU, which matters on the small machines that run prefill and decode side by side.
    // Held messages (every one left in the outbox after flush_control) only need a retry now and then.
    if (!cq_fds_.empty() && may_block()) {
      const auto idle_for = Clock::now() - last_busy;
      if (idle_for >= (awaiting_layers() ? kSpinWhileMarking : kSpinBeforeBlock))
        block_until_event(!outbox_.empty(), idle_cq_wakes_ >= kMaxIdleCqWakes && idle_for >= kIdleCqWakesFor);
      else
        sched_yield();
      continue;
    }
    // Without one (shm), or with local work waiting (a GPU copy, a full provider window): spin briefly, then
    // short sleeps. Manual-progress providers still need us to poll, so the sleep is bounded.
    if (idle < 4000) {
      sched_yield();
      continue;
    }
    std::unique_lock<std::mutex> lock(cmd_mu_);
    if (!has_commands_) cmd_cv_.wait_for(lock, std::chrono::microseconds(idle < 20000 ? 20 : 200));
  }
}

void Agent::wake_progress() {
  cmd_cv_.notify_all();
  if (wake_fd_ >= 0) {
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = write(wake_fd_, &one, sizeof(one));
  }
}

bool Agent::may_block() const {
  if (has_commands_.load(std::memory_order_acquire) || !staged_.empty() ||
      !deferred_aborts_.empty() || !pending_landings_.empty() || has_draining_.load(std::memory_order_acquire))
    return false;
  for (const auto& s : active_sends_) {
    if (s->ready.empty() || s->state() != TransferState::Pending || s->aborted) continue;
    // A layer whose copy runs on the CMA workers: they wake us when it lands.
    const auto& job = s->ready.front().cma;
    if (!job || job->done()) return false;
  }
  return true;
}

bool Agent::awaiting_layers() const {
  for (const auto& s : active_sends_)
    if (s->state() == TransferState::Pending && !s->aborted && s->layers_posted + s->ready.size() < s->num_layers)
      return true;
  return false;
}

void Agent::block_until_event(bool retry_soon, bool cq_fds_suspect) {
  const bool cq_fds_usable = !cq_fds_suspect;
  {
    std::lock_guard<std::mutex> domain(transport_mu_);
    // Something is already there: poll it first (unless the transport keeps saying so and then has nothing).
    if (!transport_->ready_to_wait() && cq_fds_usable) return;
  }
  // Same-host peers ring instead of writing on the fabric: they must see we sleep, and we must see their entries.
  if (!doorbell_rings_.empty() && !doorbell_->prepare_to_sleep(doorbell_rings_)) return;
  pollfd fds[1 + 16];
  const size_t n = cq_fds_usable ? std::min<size_t>(cq_fds_.size(), 16) : 0;
  fds[0] = {wake_fd_, POLLIN, 0};
  for (size_t i = 0; i < n; ++i) fds[1 + i] = {cq_fds_[i], POLLIN, 0};
  const auto until_check = std::chrono::duration_cast<std::chrono::milliseconds>(next_deadline_check_ - Clock::now());
  const int cap = retry_soon || !cq_fds_usable ? kRetryHeldMs : kIdleCheckMs;
  const int timeout = static_cast<int>(std::clamp<int64_t>(until_check.count() + 1, 1, cap));
  counters_.idle_waits++;
  if (::poll(fds, 1 + n, timeout) > 0) {
    if (fds[0].revents & POLLIN) {
      uint64_t v;
      [[maybe_unused]] ssize_t r = read(wake_fd_, &v, sizeof(v));
    }
    for (size_t i = 0; i < n; ++i) woke_on_cq_ |= fds[1 + i].revents != 0;
  }
  // A wait that left the fds out tries them once more next time (they may have gone quiet: a connection reply
  // came); a wait on them that no fd ended shows they are quiet.
  if (!cq_fds_usable) idle_cq_wakes_ = kMaxIdleCqWakes - 1;
  else if (!woke_on_cq_) idle_cq_wakes_ = 0;
  if (!doorbell_rings_.empty()) doorbell_->wake_up();
}

bool Agent::run_commands() {
  if (!has_commands_.load(std::memory_order_acquire)) return false;
  std::vector<Command> cmds;
  {
    std::lock_guard<std::mutex> lock(cmd_mu_);
    cmds.swap(commands_);
    has_commands_ = false;
  }
  for (auto& c : cmds) {
    switch (c.kind) {
      case Command::Kind::NewSend:
        // Failed before we got to it (the receiver's CANCEL came first; its ABORT is queued): post nothing.
        if (c.send->state() != TransferState::Pending) break;
        active_sends_.push_back(c.send);
        queue_control(*c.send->peer, ControlType::Begin, c.send->xfer_id, c.send->slot, c.send->first_layer,
                      c.send->num_layers, c.send->plan.granules_per_layer);
        break;
      case Command::Kind::LayerReady:
        c.send->ready.push_back({c.layer_index, 0, 0, nullptr});
        break;
      case Command::Kind::Control:
        if (static_cast<ControlType>(c.msg.type) == ControlType::Hello) {
          // Every rail's HELLO names the window of slots the peer is to use towards us.
          // Its ring starts empty before the HELLO hands the window out: the new producer's first entry is 1.
          if (doorbell_ && c.peer->same_host) {
            doorbell_->reset(c.peer->rx_window);
            if (std::find(doorbell_rings_.begin(), doorbell_rings_.end(), c.peer->rx_window) == doorbell_rings_.end())
              doorbell_rings_.push_back(c.peer->rx_window);
          }
          for (uint32_t rail = 0; rail < c.peer->rails; ++rail)
            queue_control(*c.peer, ControlType::Hello, 0, c.msg.slot, rail, window_slots_);
        } else {
          queue_control(*c.peer, static_cast<ControlType>(c.msg.type), c.msg.xfer_id, c.msg.slot);
        }
        break;
      case Command::Kind::InjectImm:
        count_imm(c.peer, c.layer_index);
        break;
      case Command::Kind::InjectLanding:
        if (landing_ && c.layer_index < options_.landing_slots)
          std::memcpy(landing_slot(c.msg.slot, c.layer_index), c.bytes.data(),
                      std::min(c.bytes.size(), landing_->slot_bytes()));
        on_landing(c.peer, ImmCode::encode(c.msg.slot, c.layer_index, 0));
        break;
      case Command::Kind::InjectMessage:
        if (c.wire) on_message(c.bytes.data(), c.bytes.size());
        else on_message(reinterpret_cast<const uint8_t*>(&c.msg), sizeof(c.msg));
        break;
      case Command::Kind::AbortSend:
        fail_send(c.send, ErrorKind::TransferFailed,
                  "transfer " + std::to_string(c.send->xfer_id) + " was aborted by the sender: " + c.reason);
        break;
      case Command::Kind::CancelRecv:
        cancel_recv_now(*c.peer, c.recv);
        break;
      case Command::Kind::Goodbye:
        begin_goodbye();
        goodbye_queued_ = true;
        break;
      case Command::Kind::EndPeer:
        end_peer_now(c.peer, static_cast<ErrorKind>(c.layer_index), c.reason, static_cast<ByeReason>(c.msg.xfer_id));
        break;
    }
  }
  return !cmds.empty();
}

void Agent::queue_control(PeerState& peer, ControlType type, uint64_t xfer_id, uint32_t slot, uint32_t first_layer,
                          uint32_t num_layers, uint32_t granules) {
  ControlMessage m;
  m.type = static_cast<uint8_t>(type);
  m.sender_epoch = info_.epoch;
  m.receiver_epoch = peer.info.epoch;
  m.xfer_id = xfer_id;
  m.slot = slot;
  m.first_layer = first_layer;
  m.num_layers = num_layers;
  m.granules_per_layer = granules;
  std::shared_ptr<PeerState> owner = holder_of(peer);
  if (owner) outbox_.emplace_back(std::move(owner), m);
}

bool Agent::flush_control() {
  bool any = false;
  size_t keep = 0;
  std::vector<const PeerState*> held;  // peers with a message kept back: their later ones wait too (order)
  for (size_t i = 0; i < outbox_.size(); ++i) {
    auto& [peer, msg] = outbox_[i];
    // A lost peer gets nothing more, except the BYE that says we ended it and, when we ended it ourselves, the
    // ABORTs with our totals before that BYE. Those wait for a peer that has not connected yet (ended right after
    // it was added: its HELLO takes its link even now, see on_message), for kFarewellGivesUpAfter at most.
    const bool farewell = msg.type == static_cast<uint8_t>(ControlType::Bye) ||
                          (peer->farewell && msg.type == static_cast<uint8_t>(ControlType::Abort));
    if (peer->lost && (!farewell || (!peer->connected && farewell_given_up(*peer)))) continue;
    const bool hello = msg.type == static_cast<uint8_t>(ControlType::Hello);
    msg.link = hello ? peer->link : peer->peer_link;
    if ((!hello && !peer->connected) || std::find(held.begin(), held.end(), peer.get()) != held.end()) {
      outbox_[keep++] = outbox_[i];
      continue;
    }
    // HELLOs go on the fabric (one per rail, and they hand out the ring); the rest to a same-host peer's ring.
    if (!hello && peer->doorbell && peer->doorbell->ready()) {
      if (peer->doorbell->post_control(msg)) {
        counters_.doorbell_sent++;
        any = true;
      } else {
        held.push_back(peer.get());
        outbox_[keep++] = outbox_[i];
      }
      continue;
    }
    int rc = -EAGAIN;
    try {
      rc = transport_->post_message(&msg, sizeof(msg), peer->addr, nullptr, hello ? msg.first_layer : 0);
    } catch (const Error& e) {
      mark_peer_lost(*peer, ErrorKind::PeerLost, e.what());
      continue;
    }
    if (rc == -EAGAIN) {
      held.push_back(peer.get());
      outbox_[keep++] = outbox_[i];
      continue;
    }
    if (peer->lost) peer->farewell_posted_at = Clock::now();
    any = true;
  }
  outbox_.resize(keep);
  return any;
}

bool Agent::has_messages_to(const PeerState& peer) const {
  return std::any_of(outbox_.begin(), outbox_.end(), [&](const auto& e) { return e.first.get() == &peer; });
}

void Agent::drop_messages_to(const PeerState& peer) {
  outbox_.erase(std::remove_if(outbox_.begin(), outbox_.end(), [&](const auto& e) { return e.first.get() == &peer; }),
                outbox_.end());
}

Agent::OpContext* Agent::take_context() {
  if (free_contexts_.empty()) return nullptr;
  OpContext* c = free_contexts_.back();
  free_contexts_.pop_back();
  return c;
}

void Agent::return_context(OpContext* ctx) {
  ctx->send = nullptr;
  ctx->staging_slot = -1;
  ctx->nbytes = 0;
  ctx->counts_rail = false;
  free_contexts_.push_back(ctx);
}

bool Agent::post_pending_writes() {
  bool any = false;
  size_t budget = free_contexts_.size();
  copy_bytes_left_ = kCopyBytesPerTurn;
  ++turn_;
  share_staging();
  if (!staged_.empty()) any |= advance_staged(budget);  // batches whose copy landed go out before new copies
  // Each turn another send posts first, so one large send cannot take every turn's contexts and CMA bytes.
  const size_t n = active_sends_.size();
  const size_t first = n ? first_send_++ % n : 0;
  for (size_t k = 0; k < n && budget > 0; ++k) {
    const auto& send = active_sends_[(first + k) % n];
    const bool live = send->state() == TransferState::Pending && !send->aborted;
    if (live && send->peer->connected && !send->ready.empty()) any |= post_send_ops(send, budget);
  }
  size_t keep = 0;
  for (size_t i = 0; i < active_sends_.size(); ++i) {
    auto& send = active_sends_[i];
    const bool live = send->state() == TransferState::Pending && !send->aborted;
    // Keep a send until nothing of it is in flight and it can post nothing more.
    const bool drained = send->ops_completed == send->ops_posted;
    if (!drained || (live && (send->layers_posted < send->num_layers || !send->released ||
                              send->ops_completed < send->ops_expected)))
      active_sends_[keep++] = std::move(active_sends_[i]);
  }
  active_sends_.resize(keep);
  return any;
}

bool Agent::post_send_ops(const std::shared_ptr<SendState>& owner, size_t& budget) {
  SendState& send = *owner;
  PeerState& peer = *send.peer;
  const LocalPool& src = *send.src;
  const PoolInfo& dst = peer.info.pools[send.dst_pool];
  bool any = false;
  try {
    while (!send.ready.empty() && budget > 0) {
      SendState::Cursor& cur = send.ready.front();
      if (send.path == SendPath::Cma) {
        if (!post_cma_layer(send, cur, budget)) return true;
      } else if (send.path == SendPath::CudaIpc) {
        if (!post_ipc_layer(send, cur, budget)) return true;
      } else if (send.path == SendPath::Staged) {
        if (!post_staged_layer(owner, cur)) return true;
      } else {
        const uint32_t begin = send.plan.layer_begin(cur.layer_index), end = send.plan.layer_begin(cur.layer_index + 1);
        const uint32_t layer = send.plan.first_layer + cur.layer_index;
        // Gather up to max_iov consecutive chunks-runs into one write whose immediate carries their granule sum
        // (on ordered rails the write goes without one, and each MiB of a rail's writes and the layer's last write
        // on it are followed by a zero-byte write whose immediate counts them).
        const size_t max_iov = transport_->capabilities().max_iov;
        while (begin + cur.next < end && budget > 0 && send.bytes_in_flight < kBytesInFlightPerSend * peer.rails) {
          uint32_t granules;
          const size_t n = gather_run(send.plan, begin + cur.next, end, max_iov, &granules);
          WriteIov iov[16];
          for (size_t k = 0; k < n; ++k) {
            const Write w = send.plan.write(begin + cur.next + k);
            const auto& dreg = dst.regions[w.dst_region];
            iov[k] = {reinterpret_cast<const void*>(src.regions[w.src_region].addr + w.src_offset), w.nbytes,
                      src.keys[w.src_region].desc, (peer.info.remote_virt_addr ? dreg.addr : 0) + w.dst_offset,
                      peer.write_key(dreg.rkey)};
          }
          OpContext* ctx = take_context();
          if (!ctx) return any;  // immediates took contexts this turn's budget counted for writes
          ctx->send = &send;
          for (size_t k = 0; k < n; ++k) ctx->nbytes += iov[k].nbytes;
          const int rc = coalesce_imms_ ? post_unsignalled(send, iov, n, layer, granules, ctx)
                                        : post_on_rails(peer, iov, n, ImmCode::encode(send.slot, layer, granules), ctx);
          if (rc == -EAGAIN) {
            return_context(ctx);
            counters_.eagain++;
            return any;  // the window is full in the provider; poll, then come back
          }
          cur.next += static_cast<uint32_t>(n);
          send.bytes_in_flight += ctx->nbytes;
          ++send.ops_posted;
          if (!coalesce_imms_) send.granules_posted += granules;
          --budget;
          counters_.writes_posted++;
          any = true;
        }
        if (begin + cur.next < end) return any;
        if (coalesce_imms_ && !signal_rails(send)) return any;
      }
      send.ready.erase(send.ready.begin());
      ++send.layers_posted;
    }
  } catch (const Error& e) {
    fail_send(owner, e.kind(), e.what());
  }
  return any;
}

// Spreads writes over the rails round-robin: the receiver's counters do not care which endpoint a write used. A
// rail whose window is full (EAGAIN) passes its turn to the next one; -EAGAIN when every rail is full.
int Agent::post_on_rails(PeerState& peer, const WriteIov* iov, size_t n, uint32_t imm, OpContext* ctx) {
  int rc = -EAGAIN;
  for (uint32_t tries = 0; tries < peer.rails && rc == -EAGAIN; ++tries) {
    const uint32_t rail = peer.next_rail++ % peer.rails;
    rc = transport_->post_writev(iov, n, imm, peer.addr, ctx, rail);
  }
  return rc;
}

// A data write without immediate on the next rail that takes it. A rail whose uncounted granules could not take
// this write's (an immediate counts one layer, at most kMaxGranules) gets its immediate first. -EAGAIN when no
// rail took the write.
int Agent::post_unsignalled(SendState& send, const WriteIov* iov, size_t n, uint32_t layer, uint32_t granules,
                            OpContext* ctx) {
  PeerState& peer = *send.peer;
  int rc = -EAGAIN;
  for (uint32_t tries = 0; tries < peer.rails && rc == -EAGAIN; ++tries) {
    const uint32_t rail = peer.next_rail++ % peer.rails;
    KVXFER_ASSERT(rail < send.unsignalled.size());
    uint32_t& pending = send.unsignalled[rail];
    if (pending > 0 &&
        (send.unsignalled_layer != layer || pending + granules > ImmCode::kMaxGranules ||
         send.unsignalled_bytes[rail] >= kBytesPerRailSignal) &&
        !signal_rail(send, rail))
      continue;
    rc = transport_->post_plain_writev(iov, n, peer.addr, ctx, rail);
    if (rc == 0) {
      pending += granules;
      send.unsignalled_bytes[rail] += ctx->nbytes;
      send.unsignalled_layer = layer;
    }
  }
  return rc;
}

// The zero-byte write that counts a rail's writes since its last one: posted after them on the same connection,
// so the peer sees its immediate only once their data landed. Addressed to the peer's signal pad, like every
// zero-byte signal. Never through a same-host peer's doorbell ring, which would overtake the data on the wire.
bool Agent::signal_rail(SendState& send, uint32_t rail) {
  uint32_t& pending = send.unsignalled[rail];
  if (pending == 0) return true;
  if (!write_signal(send, ImmCode::encode(send.slot, send.unsignalled_layer, pending), rail, true)) return false;
  ++send.ops_posted;
  ++send.ops_expected;  // the plan counted the data writes; how many immediates follow them is known only now
  ++send.rail_signals;
  pending = 0;
  send.unsignalled_bytes[rail] = 0;
  counters_.imm_writes++;
  return true;
}

bool Agent::signal_rails(SendState& send) {
  bool all = true;
  for (uint32_t rail = 0; rail < send.peer->rails; ++rail) all &= signal_rail(send, rail);
  return all;
}

// A failed send's ABORT names the granules the receiver must count before it may reuse the blocks, so it waits
// until no copy of ours still writes into the peer for it and, on ordered rails, until the writes already posted
// are counted: otherwise their data could land after the blocks were handed out again. A lost peer takes no more.
bool Agent::abort_may_go(SendState& send) {
  if (!copies_landed(send)) return false;
  if (send.peer->lost) return true;
  try {
    return signal_rails(send);
  } catch (const Error&) {
    return false;  // the connection is failing: the peer will be lost, which settles the send without an ABORT
  }
}

// Copy phase: cur.next in [0, nwrites) counts chunks copied. Signal phase: [nwrites, nwrites + nsignals) counts
// zero-byte immediates posted. Returns true when the layer is fully posted. Layers of at least
// CmaWorkers::kMinParallelBytes are copied by the CMA workers, the smaller ones here, 1024 chunks per step.
bool Agent::post_cma_layer(SendState& send, SendState::Cursor& cur, size_t& budget) {
  PeerState& peer = *send.peer;
  const uint32_t begin = send.plan.layer_begin(cur.layer_index), end = send.plan.layer_begin(cur.layer_index + 1);
  const uint32_t nwrites = end - begin;
  if (cur.next < nwrites) {
    CmaWorkers* workers = send.plan.bytes_per_layer >= CmaWorkers::kMinParallelBytes ? cma_workers() : nullptr;
    if (workers) {
      submit_cma_layers(send, *workers);
      if (!cur.cma->done()) return false;
      const std::shared_ptr<CmaJob> job = std::move(cur.cma);
      job->rethrow_if_failed();
      cur.next = nwrites;
    } else {
      if (copy_bytes_left_ == 0) return false;  // this turn's share is copied: messages first
      const uint32_t max_n = std::min<uint32_t>(nwrites - cur.next, kCmaOpsPerStep);
      uint32_t n = 0;
      uint64_t bytes = 0;
      for (; n < max_n; ++n) {  // sizes from the plan's shapes: only the ops this turn copies are built
        const uint64_t b = send.plan.shape(begin + cur.next + n).nbytes;
        if (n > 0 && bytes + b > copy_bytes_left_) break;
        bytes += b;
      }
      CmaOp ops[kCmaOpsPerStep];
      cma_ops(send, begin + cur.next, n, ops);
      CmaCopier(static_cast<pid_t>(peer.info.pid)).copy(ops, n);
      copy_bytes_left_ -= std::min(copy_bytes_left_, bytes);
      cur.next += n;
      if (cur.next < nwrites) return false;
    }
  }
  return post_signals(send, cur, nwrites, budget);
}

void Agent::cma_ops(const SendState& send, uint32_t first, uint32_t n, CmaOp* ops) const {
  const LocalPool& src = *send.src;
  const PoolInfo& dst = send.peer->info.pools[send.dst_pool];
  for (uint32_t k = 0; k < n; ++k) {
    const Write w = send.plan.write(first + k);
    ops[k] = {reinterpret_cast<const void*>(src.regions[w.src_region].addr + w.src_offset),
              dst.regions[w.dst_region].addr + w.dst_offset, w.nbytes};
  }
}

// Queues the copies of ready layers not queued yet, in marking order, so the workers go from one layer to the
// next while the progress thread posts the previous layer's signals.
void Agent::submit_cma_layers(SendState& send, CmaWorkers& workers) {
  size_t in_flight = 0;
  std::vector<CmaOp> ops;
  for (auto& c : send.ready) {
    if (c.cma) {
      ++in_flight;
      continue;
    }
    if (c.next > 0) continue;  // copied (signals going out)
    if (in_flight == kCmaLayersInFlight) break;
    const uint32_t begin = send.plan.layer_begin(c.layer_index), end = send.plan.layer_begin(c.layer_index + 1);
    ops.resize(end - begin);
    cma_ops(send, begin, end - begin, ops.data());
    c.cma = workers.submit(static_cast<pid_t>(send.peer->info.pid), ops.data(), ops.size());
    counters_.cma_jobs++;
    ++in_flight;
  }
}

CmaWorkers* Agent::cma_workers() {
  if (!cma_threads_) return nullptr;
  if (!cma_workers_) cma_workers_ = std::make_unique<CmaWorkers>(cma_threads_, [this] { wake_progress(); });
  return cma_workers_.get();
}

// Signal phase of a layer whose bytes are already in the peer (CMA, CUDA IPC): cursor positions
// [copied, copied + nsignals) count the zero-byte immediates posted, each carrying up to kMaxGranules granules.
// Returns true when the layer is fully posted.
bool Agent::post_signals(SendState& send, SendState::Cursor& cur, uint32_t copied, size_t& budget) {
  const uint32_t layer = send.first_layer + cur.layer_index;
  const uint32_t total = send.plan.granules_per_layer;
  const uint32_t nsignals = (total + ImmCode::kMaxGranules - 1) / ImmCode::kMaxGranules;
  while (cur.next - copied < nsignals && budget > 0) {
    const uint32_t i = cur.next - copied;
    const uint32_t g = std::min<uint32_t>(ImmCode::kMaxGranules, total - i * ImmCode::kMaxGranules);
    if (!post_signal(send, ImmCode::encode(send.slot, layer, g))) return false;
    ++cur.next;
    ++send.ops_posted;
    --budget;
  }
  return cur.next - copied == nsignals;
}

// A same-host peer's ring takes the immediate (complete at once: it is in the peer's memory); otherwise a
// zero-byte write on the fabric, addressed to the peer's signal pad and not the pool, which may be GPU memory the
// fabric never registered. The caller has counted the op as posted (or counts it after a true return).
bool Agent::post_signal(SendState& send, uint32_t imm) {
  PeerState& peer = *send.peer;
  if (peer.doorbell && peer.doorbell->ready()) {
    if (!peer.doorbell->post_imm(imm)) {
      counters_.eagain++;
      return false;
    }
    counters_.doorbell_sent++;
    send.granules_posted += ImmCode::granules(imm);
    ++send.ops_completed;
    return true;
  }
  return write_signal(send, imm, 0, false);
}

// A zero-byte write with immediate to the peer's signal pad on `rail`; its granules count as posted. False: no
// context or the provider's queue is full (try again later).
bool Agent::write_signal(SendState& send, uint32_t imm, uint32_t rail, bool counts_rail) {
  OpContext* ctx = take_context();
  if (!ctx) return false;
  ctx->send = &send;
  ctx->counts_rail = counts_rail;
  const PeerState& peer = *send.peer;
  const int rc = transport_->post_write(nullptr, 0, nullptr, imm, peer.addr,
                                        peer.info.remote_virt_addr ? peer.info.signal_addr : 0, peer.write_key(peer.info.signal_rkey),
                                        ctx, rail);
  if (rc == -EAGAIN) {
    return_context(ctx);
    counters_.eagain++;
    return false;
  }
  send.granules_posted += ImmCode::granules(imm);
  return true;
}

bool Agent::poll_doorbell() {
  DoorbellItem items[64];
  bool any = false;
  for (uint32_t w : doorbell_rings_) {
    const size_t n = doorbell_->drain(w, items, 64);
    if (n) {
      on_doorbell_items(w, items, n);
      any = true;
    }
  }
  return any;
}

// Entries of ring w count only for the peer that owns window w: an immediate naming another window's slot, or a
// message claiming another sender, is dropped and counted like any malformed fabric message.
void Agent::on_doorbell_items(uint32_t w, const DoorbellItem* items, size_t n) {
  std::shared_ptr<PeerState> owner;
  {
    std::lock_guard<std::mutex> lock(peers_mu_);
    owner = window_owner_[w].lock();
  }
  counters_.doorbell_received += n;
  if (owner) owner->heard += n;
  for (size_t i = 0; i < n; ++i) {
    const DoorbellItem& it = items[i];
    if (it.kind == DoorbellEntry::kImm) {
      if (owner && ImmCode::slot(it.imm) / window_slots_ == w) count_imm(owner, it.imm);
      else counters_.unknown_imms++;
    } else if (it.kind == DoorbellEntry::kControl && owner && it.msg.sender_epoch == owner->info.epoch &&
               it.msg.type != static_cast<uint8_t>(ControlType::Hello)) {
      on_message(reinterpret_cast<const uint8_t*>(&it.msg), sizeof(it.msg));
    } else {
      counters_.dropped_messages++;
    }
  }
}

bool Agent::poll_completions() {
  Event events[64];
  const bool rung = poll_doorbell();
  const size_t n = transport_->poll(events, 64);
  for (size_t i = 0; i < n; ++i) {
    Event& e = events[i];
    switch (e.kind) {
      case Event::Kind::WriteDone:
      case Event::Kind::SendDone:
        if (e.context) on_write_done(static_cast<OpContext*>(e.context), nullptr);
        break;
      case Event::Kind::OpError:
        if (e.context) on_write_done(static_cast<OpContext*>(e.context), &e.error);
        break;
      case Event::Kind::RemoteData:
        on_remote_data(e.imm);
        break;
      case Event::Kind::Message:
        on_message(e.msg, e.msg_len);
        break;
    }
  }
  return rung || n > 0;
}

void Agent::on_write_done(OpContext* ctx, const std::string* error) {
  SendState* send = ctx->send;
  if (ctx->staging_slot >= 0) release_staging(send, ctx->staging_slot);
  if (send) send->bytes_in_flight -= ctx->nbytes;
  const bool counted_rail = ctx->counts_rail;
  return_context(ctx);
  if (!send) return;
  ++send->ops_completed;
  send->rail_signals_completed += counted_rail;
  if (error) {
    mark_peer_lost(*send->peer, ErrorKind::PeerLost,
                   "a write to peer '" + send->peer->info.name + "' failed (" + *error + ")");
    return;
  }
  maybe_finish_send(*send);
}

void Agent::maybe_finish_send(SendState& send) {
  if (send.released && send.ops_completed == send.ops_expected && send.layers_posted == send.num_layers) {
    for (uint32_t l = send.first_layer; l < send.first_layer + send.num_layers; ++l) send.mark_layer_done(l);
    send.writes_over = true;  // before DONE is visible: a waiter that saw DONE also sees this
    send.finish();
  }
}

std::shared_ptr<PeerState> Agent::peer_by_epoch(uint64_t epoch) {
  std::lock_guard<std::mutex> lock(peers_mu_);
  auto it = peers_by_epoch_.find(epoch);
  return it == peers_by_epoch_.end() ? nullptr : it->second;
}

std::shared_ptr<PeerState> Agent::association(uint64_t epoch, uint32_t link) {
  std::lock_guard<std::mutex> lock(peers_mu_);
  auto it = peers_by_epoch_.find(epoch);
  if (it != peers_by_epoch_.end() && (link == 0 || it->second->link == link)) return it->second;
  for (const auto& p : ended_associations_)
    if (p->info.epoch == epoch && p->link == link) return p;
  return it == peers_by_epoch_.end() ? nullptr : it->second;  // (a link of none: dropped by the caller)
}

std::shared_ptr<PeerState> Agent::holder_of(const PeerState& peer) {
  std::lock_guard<std::mutex> lock(peers_mu_);
  auto it = peers_by_epoch_.find(peer.info.epoch);
  if (it != peers_by_epoch_.end() && it->second.get() == &peer) return it->second;
  for (const auto& p : ended_associations_)
    if (p.get() == &peer) return p;
  return nullptr;
}

// The sender of an immediate is the owner of its slot's window, not the completion's source address: rxm-based
// providers (tcp, verbs) report no source for remote writes, and the first peer would be credited with all of them.
void Agent::on_remote_data(uint32_t imm) {
  counters_.imms_received++;
  std::shared_ptr<PeerState> peer;
  {
    std::lock_guard<std::mutex> lock(peers_mu_);
    peer = window_owner_[ImmCode::slot(imm) / window_slots_].lock();
  }
  if (!peer) {
    counters_.unknown_imms++;  // no peer owns that window: its writes cannot be attributed, so nothing counts them
    return;
  }
  peer->heard++;
  if (ImmCode::granules(imm) == 0) on_landing(peer, imm);  // a batch in a landing slot, counted once copied
  else count_imm(peer, imm);
}

void Agent::count_imm(const std::shared_ptr<PeerState>& peer, uint32_t imm) {
  const uint32_t slot = ImmCode::slot(imm), layer = ImmCode::layer(imm), g = ImmCode::granules(imm);
  std::lock_guard<std::mutex> lock(peer->mu);
  SlotCounter& s = peer->slots[slot];
  s.seen += g;
  if (s.aborted) {  // nothing counts towards a transfer any more; the slot waits for the sender's last writes
    maybe_reclaim_aborted(*peer, slot);
    return;
  }
  if (!s.in_use) {
    s.in_use = true;
    if (s.counts.empty()) s.counts.assign(ImmCode::kMaxLayers, 0);
  }
  s.counts[layer] += g;
  if (s.begun) check_slot(*peer, slot);
}

// Re-evaluates a begun slot after its counts changed (peer.mu held). Counts above the expectation, or outside the
// announced layers, are a protocol violation: the transfer fails rather than ever reporting a wrong completion.
void Agent::flush_gpu_direct_writes() {
  for (uint64_t m = gpu_direct_flush_devices_.load(std::memory_order_acquire); m; m &= m - 1)
    gpu::flush_gpu_direct_writes(__builtin_ctzll(m));
}

void Agent::check_slot(PeerState& peer, uint32_t slot) {
  SlotCounter& s = peer.slots[slot];
  uint32_t complete = 0;
  std::string violation;
  for (uint32_t l = 0; l < ImmCode::kMaxLayers; ++l) {
    const uint32_t c = s.counts[l];
    if (l < s.first_layer || l >= s.first_layer + s.num_layers) {
      if (c) violation = "granules arrived for layer " + std::to_string(l) + " outside the announced range";
      continue;
    }
    if (c > s.granules_per_layer) violation = "layer " + std::to_string(l) + " received more chunks than announced";
    if (c == s.granules_per_layer) ++complete;
  }
  // A NIC's writes into GPU memory may not yet be visible to the GPU's kernels when their completions reach us:
  // made visible before anyone (recv.wait, a DeviceCounter's wait kernel) is told the layer landed.
  if (complete > s.layers_complete) flush_gpu_direct_writes();
  if (s.recv)
    for (uint32_t l = s.first_layer; l < s.first_layer + s.num_layers && l < ImmCode::kMaxLayers; ++l)
      if (s.counts[l] == s.granules_per_layer) s.recv->mark_layer_done(l);
  s.layers_complete = complete;
  const uint64_t xfer = s.xfer_id;
  if (!violation.empty()) {
    if (s.recv) s.recv->fail(ErrorKind::TransferFailed, "transfer " + std::to_string(xfer) + ": " + violation);
    peer.live_recvs.erase(xfer);
    peer.waiting_recvs.erase(xfer);
    peer.slot_of_xfer.erase(xfer);
    s.aborted = true;
    return;
  }
  if (complete < s.num_layers) return;
  if (s.recv) {
    s.recv->finish();
    peer.live_recvs.erase(xfer);
  } else {
    peer.arrived[xfer] = {s.first_layer, s.num_layers, s.granules_per_layer};
    peer.arrived_order.push_back(xfer);
    if (peer.arrived_order.size() > kArrivedMemory) {
      peer.arrived.erase(peer.arrived_order.front());
      peer.arrived_order.pop_front();
    }
  }
  peer.slot_of_xfer.erase(xfer);
  s.reset();
  queue_control(peer, ControlType::Release, xfer, slot);
}

// An aborted slot is handed back to its sender (ABORT_ACK) once exactly the granules the sender said it posted have
// arrived: after that no write of the failed transfer is in flight, so the next transfer's counts start clean. More
// than announced is a sender bug: the slot then stays quarantined for good (peer.mu held).
void Agent::maybe_reclaim_aborted(PeerState& peer, uint32_t slot) {
  SlotCounter& s = peer.slots[slot];
  if (!s.aborted || !s.abort_total_known) return;
  if (s.seen > s.abort_total) {
    counters_.slot_violations++;
    s.abort_total_known = false;
    return;
  }
  if (s.seen < s.abort_total) return;
  const uint64_t xfer = s.xfer_id;
  s.reset();
  queue_control(peer, ControlType::AbortAck, xfer, slot);
}

void Agent::on_message(const uint8_t* data, size_t nbytes) {
  ControlMessage m;
  if (nbytes != sizeof(m)) {
    counters_.dropped_messages++;
    return;
  }
  std::memcpy(&m, data, sizeof(m));
  if (m.magic != ControlMessage::kMagic || m.version != ControlMessage::kVersion || m.receiver_epoch != info_.epoch ||
      m.slot >= ImmCode::kMaxSlots) {
    counters_.dropped_messages++;
    return;
  }
  const auto type = static_cast<ControlType>(m.type);
  if (type == ControlType::Hello) {
    // A HELLO names the window we are to send with: its base (slot) and size (num_layers), the peer's choice.
    if (m.first_layer >= 32 || !ImmCode::valid_window(m.slot, m.num_layers)) {
      counters_.dropped_messages++;
      return;
    }
    std::lock_guard<std::mutex> lock(peers_mu_);
    auto it = peers_by_epoch_.find(m.sender_epoch);
    // A peer we lost that adds us again (a new link number) comes before we add it again: its HELLO waits for that
    // add like one from a peer never seen; a late HELLO of the lost association (its number) is dropped.
    const bool again = it != peers_by_epoch_.end() && it->second->lost;
    // A peer we ended before it ever connected (refused, or removed at once) still gets our BYE (flush_control):
    // its HELLO gives the link to address it with. (That association is over: the HELLO connects nothing else.)
    if (again && it->second->farewell && !it->second->connected && m.link != 0 &&
        (it->second->peer_link == 0 || it->second->peer_link == m.link)) {
      PeerState& ended = *it->second;
      ended.peer_link = m.link;
      ended.hello_rails |= 1u << m.first_layer;
      if ((ended.hello_rails & ((1u << ended.rails) - 1)) == (1u << ended.rails) - 1) ended.connected = true;
      return;
    }
    if (again && (m.link == 0 || m.link == it->second->peer_link)) {
      counters_.dropped_messages++;
      return;
    }
    // A HELLO of a newer association than the live one we know: the peer ended ours and added us again before we
    // heard (its BYE is on the way, or we removed it and have not added it again yet). It waits for our add of
    // that association like one from a peer never seen, rather than redirecting the association it ended.
    const bool newer = it != peers_by_epoch_.end() && !it->second->lost && it->second->peer_link != 0 &&
                       m.link > it->second->peer_link;
    // A peer numbers its associations with us in increasing order: a HELLO of an older one than we know (late on
    // the wire, the peer having ended it and added us again) addresses nothing live.
    if (it == peers_by_epoch_.end() || again || newer) {
      EarlyHello& e = early_hellos_[m.sender_epoch];
      if (e.link != 0 && m.link < e.link) {
        counters_.dropped_messages++;
        return;
      }
      if (e.link != m.link) e = EarlyHello{};  // an earlier association's rails do not count for this one
      e.rails |= 1u << m.first_layer;
      e.link = m.link;
      e.window = true;
      e.window_base = m.slot;
      e.window_slots = m.num_layers;
      return;
    }
    PeerState& peer = *it->second;
    if (peer.peer_link != 0 && m.link < peer.peer_link) {
      counters_.dropped_messages++;
      return;
    }
    {
      std::lock_guard<std::mutex> pl(peer.mu);
      peer.take_window(m.slot, m.num_layers);
    }
    learn_peer_link(peer, m.link);
    peer.hello_rails |= 1u << m.first_layer;
    if ((peer.hello_rails & ((1u << peer.rails) - 1)) == (1u << peer.rails) - 1) peer.connected = true;
    return;
  }
  const std::shared_ptr<PeerState> peer = association(m.sender_epoch, m.link);
  // From a peer we ended ourselves, its ABORTs and answering BYE still count: they settle our ended recvs from it.
  const bool answer = peer && peer->farewell && (type == ControlType::Abort || type == ControlType::Bye);
  if (!peer || (peer->lost && !answer) || (m.link != 0 && m.link != peer->link)) {  // the last: an earlier association's
    counters_.dropped_messages++;
    return;
  }
  peer->heard++;
  switch (type) {
    case ControlType::Ping: break;  // "still here": counted above
    case ControlType::Begin: on_begin(*peer, m); break;
    case ControlType::Release: on_release(*peer, m); break;
    case ControlType::Abort: on_abort(*peer, m); break;
    case ControlType::AbortAck: on_abort_ack(*peer, m); break;
    case ControlType::Cancel: on_cancel(*peer, m); break;
    case ControlType::CancelAck: on_cancel_ack(*peer, m); break;
    case ControlType::Landed: on_landed(*peer, m); break;
    case ControlType::Bye: on_bye(peer, m); break;
    default: counters_.dropped_messages++;
  }
}

void Agent::on_begin(PeerState& peer, const ControlMessage& m) {
  if (m.num_layers == 0 || m.first_layer + m.num_layers > ImmCode::kMaxLayers || m.granules_per_layer == 0) {
    counters_.dropped_messages++;
    return;
  }
  std::lock_guard<std::mutex> lock(peer.mu);
  SlotCounter& s = peer.slots[m.slot];
  if (s.begun || s.aborted) {
    counters_.dropped_messages++;  // the sender never reuses a slot before RELEASE; drop a duplicate
    return;
  }
  if (s.counts.empty()) s.counts.assign(ImmCode::kMaxLayers, 0);
  s.in_use = s.begun = true;
  s.xfer_id = m.xfer_id;
  s.first_layer = m.first_layer;
  s.num_layers = m.num_layers;
  s.granules_per_layer = m.granules_per_layer;
  peer.slot_of_xfer[m.xfer_id] = m.slot;
  if (auto it = peer.waiting_recvs.find(m.xfer_id); it != peer.waiting_recvs.end()) {
    auto recv = it->second;
    peer.waiting_recvs.erase(it);
    s.watch(recv);
    if (recv->first_layer != m.first_layer || recv->num_layers != m.num_layers ||
        recv->granules_per_layer != m.granules_per_layer) {
      recv->fail(ErrorKind::TransferFailed,
                 describe_count_mismatch(m.first_layer, m.num_layers, m.granules_per_layer, recv->first_layer,
                                         recv->num_layers, recv->granules_per_layer));
      peer.live_recvs.erase(m.xfer_id);
    } else {
      s.recv = recv;
    }
  }
  watch_cancelled(peer, s, m.xfer_id);
  check_slot(peer, m.slot);
}

void Agent::on_release(PeerState& peer, const ControlMessage& m) {
  std::shared_ptr<SendState> send;
  {
    std::lock_guard<std::mutex> lock(peer.mu);
    send = peer.send_by_slot[m.slot];
    if (!send || send->xfer_id != m.xfer_id) {
      // The transfer completed on the receiver just as it failed here (a deadline): RELEASE frees the slot too.
      if (peer.reclaim(m.slot, m.xfer_id)) {
        counters_.slots_reclaimed++;
        grant_slots(peer);
      } else {
        counters_.dropped_messages++;
      }
      return;
    }
    peer.send_by_slot[m.slot].reset();
    peer.live_sends.erase(m.xfer_id);
    peer.free_slots.push_back(m.slot);
    grant_slots(peer);
  }
  send->released = true;
  maybe_finish_send(*send);
}

void Agent::on_abort(PeerState& peer, const ControlMessage& m) {
  std::lock_guard<std::mutex> lock(peer.mu);
  SlotCounter& s = peer.slots[m.slot];
  if (!s.in_use && !s.begun && !s.aborted) {
    // Nothing of it is pending here: it completed (our RELEASE is on its way) or never wrote. Hand the slot back.
    if (!peer.arrived.count(m.xfer_id)) remember_abandoned(peer, m.xfer_id, m.slot);
    queue_control(peer, ControlType::AbortAck, m.xfer_id, m.slot);
    if (auto it = peer.cancelled_recvs.find(m.xfer_id); it != peer.cancelled_recvs.end()) {
      it->second->writes_over = true;  // as the ACK says: nothing of it is still on its way
      peer.cancelled_recvs.erase(it);
    }
    return;
  }
  if (s.begun && s.xfer_id != m.xfer_id) {
    counters_.dropped_messages++;  // names another transfer than the one bound to the slot
    return;
  }
  s.aborted = true;
  s.xfer_id = m.xfer_id;
  s.abort_total_known = true;
  s.abort_total = m.posted_total();
  // An ABORT of a peer ending us names why, as its BYE will; one of a send that failed on its own is plain.
  const bool ending = m.first_layer >= kAbortClosing && m.first_layer <= kAbortAnswer;
  const ErrorKind kind = ending ? ErrorKind::PeerLost : ErrorKind::TransferFailed;
  const std::string why = ending ? "peer '" + peer.info.name + ended_because(bye_reason_of_abort(m.first_layer))
                                 : "the sender abandoned transfer " + std::to_string(m.xfer_id) +
                                       " (it failed or timed out on the sending side); its blocks may be partly written";
  if (s.recv) s.recv->fail(kind, why);
  if (auto it = peer.waiting_recvs.find(m.xfer_id); it != peer.waiting_recvs.end()) {
    it->second->fail(kind, why);
    s.watch(it->second);  // its writes (granules can come before the BEGIN) are over when the total is counted
  }
  if (!s.recv && !peer.waiting_recvs.count(m.xfer_id)) remember_abandoned(peer, m.xfer_id, m.slot);
  peer.waiting_recvs.erase(m.xfer_id);
  peer.live_recvs.erase(m.xfer_id);
  peer.slot_of_xfer.erase(m.xfer_id);
  s.recv.reset();
  watch_cancelled(peer, s, m.xfer_id);
  watch_removed(peer, s, m.xfer_id);
  maybe_reclaim_aborted(peer, m.slot);
}

// A peer we ended ourselves (lost here) sent an ABORT with the total of its transfer: a recv of it that ended with
// the peer while still waiting for its BEGIN is watched by the slot now, so the answering BYE does not take it as
// never written (peer.mu held).
void Agent::watch_removed(PeerState& peer, SlotCounter& s, uint64_t xfer_id) {
  for (const auto& r : peer.removed_recvs)
    if (r->xfer_id == xfer_id && !r->writes_over) s.watch(r);
}

// BYE: the peer ended us. Closed (or answering us): it posts nothing more and its totals came first (when the BYE
// says so), so our recvs from it settle by counting. Removed or judged silent: it may live on and still count what
// we wrote, so we end it in turn (end_peer_now): our sends fail with ABORTs carrying their totals and a BYE of ours
// answers, which lets it settle its recvs from us. From a peer we ended ourselves (lost here), the BYE is that
// answer: only its totals are new.
void Agent::on_bye(const std::shared_ptr<PeerState>& owner, const ControlMessage& m) {
  PeerState& peer = *owner;
  const auto reason = static_cast<ByeReason>(m.xfer_id);
  const bool totals = m.num_layers == kByeTotalsSent;
  if (peer.lost) {
    if (!totals) return;
    std::vector<std::shared_ptr<RecvState>> settled;
    {
      std::lock_guard<std::mutex> lock(peer.mu);
      std::vector<std::shared_ptr<RecvState>> recvs = peer.removed_recvs;
      settled = settle_by_totals(peer, recvs);
    }
    for (auto& r : settled) r->writes_over = true;
    return;
  }
  const std::string why = "peer '" + peer.info.name + ended_because(reason);
  if (reason == kByeClosed || reason == kByeAnswer) {
    mark_peer_lost(peer, ErrorKind::PeerLost, why, false, totals);
    return;
  }
  end_peer_now(owner, ErrorKind::PeerLost, why, kByeAnswer, totals);
}

// Called by the closing agent's thread (tell_agents_in_this_process). Under our transport lock, so our progress
// thread is not posting to it meanwhile; after it, nothing is: the peer is lost (nothing but a farewell goes to a
// lost peer, and its queued messages are dropped here) and its address is never released through the transport
// (release_lost_peer skips it), which would reach into the region being unmapped too.
void Agent::peer_closing_in_this_process(uint64_t epoch, bool writes_over) {
  std::lock_guard<std::mutex> domain(transport_mu_);
  {
    std::lock_guard<std::mutex> lock(peers_mu_);
    for (const auto& ended : ended_associations_)  // lost already; the transport must not touch them either
      if (ended->info.epoch == epoch) {
        ended->transport_released = true;
        drop_messages_to(*ended);
      }
  }
  const std::shared_ptr<PeerState> peer = peer_by_epoch(epoch);
  if (!peer) return;
  peer->transport_released = true;
  drop_messages_to(*peer);
  goodbye_pending_.erase(std::remove_if(goodbye_pending_.begin(), goodbye_pending_.end(),
                                        [&](const PendingBye& b) { return b.peer == peer; }),
                         goodbye_pending_.end());
  if (!peer->lost) mark_peer_lost(*peer, ErrorKind::PeerLost, "peer '" + peer->info.name + ended_because(kByeClosed),
                                  writes_over);
}

void Agent::remember_abandoned(PeerState& peer, uint64_t xfer_id, uint32_t slot) {
  if (!peer.abandoned.emplace(xfer_id, slot).second) return;
  peer.abandoned_order.push_back(xfer_id);
  if (peer.abandoned_order.size() > kArrivedMemory) {
    peer.abandoned.erase(peer.abandoned_order.front());
    peer.abandoned_order.pop_front();
  }
}

void Agent::on_abort_ack(PeerState& peer, const ControlMessage& m) {
  std::lock_guard<std::mutex> lock(peer.mu);
  if (peer.reclaim(m.slot, m.xfer_id)) {
    counters_.slots_reclaimed++;
    grant_slots(peer);
  } else {
    counters_.dropped_messages++;  // not quarantined (a RELEASE reclaimed it first) or a stale id
  }
}

// Slots that came back go to the sends waiting for one, oldest first; each then starts like any other (peer.mu held;
// post_command takes only cmd_mu_).
void Agent::grant_slots(PeerState& peer) {
  while (!peer.free_slots.empty() && !peer.slot_waiters.empty()) {
    std::shared_ptr<SendState> send = std::move(peer.slot_waiters.front());
    peer.slot_waiters.pop_front();
    send->waiting_for_slot = false;
    peer.take_slot(send);
    post_command(Command{Command::Kind::NewSend, send, 0, nullptr, {}});
  }
}

// The receiver cancelled transfer X. A live send of X fails and ends with the usual ABORT (its posted total), which
// tells the receiver when its writes are over. Otherwise X is remembered (send() refuses it) and, unless a failed
// send of X still awaits its ABORT_ACK, the receiver is told nothing of X can arrive (CANCEL_ACK).
void Agent::on_cancel(PeerState& peer, const ControlMessage& m) {
  std::shared_ptr<SendState> send;
  bool in_flight = false;
  {
    std::lock_guard<std::mutex> lock(peer.mu);
    if (auto it = peer.live_sends.find(m.xfer_id); it != peer.live_sends.end()) send = it->second;
    for (const auto& [slot, s] : peer.quarantined) in_flight = in_flight || s->xfer_id == m.xfer_id;
    if (peer.cancelled_ids.insert(m.xfer_id).second) {
      peer.cancelled_order.push_back(m.xfer_id);
      if (peer.cancelled_order.size() > kArrivedMemory) {
        peer.cancelled_ids.erase(peer.cancelled_order.front());
        peer.cancelled_order.pop_front();
      }
    }
  }
  if (send && m.first_layer == kCancelRefused) {
    fail_send(send, ErrorKind::TransferFailed,
              "transfer " + std::to_string(m.xfer_id) + " to peer '" + peer.info.name +
                  "': the receiver refused one of its landing batches (its Recv error and last_landing_error say "
                  "why); nothing more is posted for it (" + describe_progress(*send) + ")");
    return;
  }
  if (send) {
    fail_send(send, ErrorKind::Cancelled,
              "transfer " + std::to_string(m.xfer_id) + " to peer '" + peer.info.name +
                  "' was cancelled by the receiver (its Recv.cancel); nothing more is posted for it (" +
                  describe_progress(*send) + ")");
    return;
  }
  if (!in_flight) queue_control(peer, ControlType::CancelAck, m.xfer_id, 0);
}

void Agent::on_cancel_ack(PeerState& peer, const ControlMessage& m) {
  std::lock_guard<std::mutex> lock(peer.mu);
  auto it = peer.cancelled_recvs.find(m.xfer_id);
  if (it == peer.cancelled_recvs.end()) return;  // a BEGIN or ABORT bound it to a slot since: the slot tells it
  it->second->writes_over = true;
  peer.cancelled_recvs.erase(it);
}

// A cancelled recv that no slot watched yet is bound to the slot its transfer turned up in (peer.mu held).
void Agent::watch_cancelled(PeerState& peer, SlotCounter& s, uint64_t xfer_id) {
  auto it = peer.cancelled_recvs.find(xfer_id);
  if (it == peer.cancelled_recvs.end()) return;
  s.watch(it->second);
  peer.cancelled_recvs.erase(it);
}

// Progress thread side of Agent::cancel_recv (the recv has failed already): unhook it from what would complete it,
// make sure something will tell it when its writes are over, and tell the sender.
void Agent::cancel_recv_now(PeerState& peer, const std::shared_ptr<RecvState>& recv) {
  if (recv->writes_over) return;
  const uint64_t x = recv->xfer_id;
  std::lock_guard<std::mutex> lock(peer.mu);
  if (peer.lost) {  // ended with the peer: settled like its other ended recvs (its process seen gone)
    if (std::find(peer.removed_recvs.begin(), peer.removed_recvs.end(), recv) == peer.removed_recvs.end())
      peer.removed_recvs.push_back(recv);
    return;
  }
  if (auto it = peer.waiting_recvs.find(x); it != peer.waiting_recvs.end() && it->second == recv)
    peer.waiting_recvs.erase(it);
  if (auto it = peer.live_recvs.find(x); it != peer.live_recvs.end() && it->second == recv) peer.live_recvs.erase(it);
  bool watched = false;
  if (auto it = peer.slot_of_xfer.find(x); it != peer.slot_of_xfer.end()) {
    SlotCounter& s = peer.slots[it->second];
    if (s.recv == recv) s.recv.reset();
    s.watch(recv);
    watched = true;
  } else {
    peer.slots.for_each([&](const SlotCounter& slot) { watched = watched || slot.watches(recv); });
  }
  if (!watched) peer.cancelled_recvs[x] = recv;
  queue_control(peer, ControlType::Cancel, x, 0);
}

void Agent::fail_send(const std::shared_ptr<SendState>& owner, ErrorKind kind, const std::string& why) {
  SendState& send = *owner;
  if (!send.fail(kind, why)) return;
  send.aborted = true;
  PeerState& peer = *send.peer;
  // A released slot is already free (the receiver counted everything). Otherwise it stays quarantined: writes
  // already posted may still land, so it is handed out again only after the receiver counted all of them.
  bool quarantine = !send.released && !peer.lost;
  {
    std::lock_guard<std::mutex> lock(peer.mu);
    peer.live_sends.erase(send.xfer_id);
    if (send.waiting_for_slot) {  // it never had a slot: nothing was posted, nothing to count or hand back
      send.waiting_for_slot = false;
      auto it = std::find(peer.slot_waiters.begin(), peer.slot_waiters.end(), owner);
      if (it != peer.slot_waiters.end()) peer.slot_waiters.erase(it);
      quarantine = false;
    } else {
      if (peer.send_by_slot[send.slot].get() == &send) peer.send_by_slot[send.slot].reset();
      if (quarantine) peer.quarantined[send.slot] = owner;
    }
  }
  if (send.released) send.writes_over = true;  // the receiver counted everything before we failed
  if (!quarantine) {
    if (!send.released) drain_locally(owner);
    return;
  }
  if (abort_may_go(send)) {
    queue_abort(send);
  } else {
    // A copy into the peer is still running, or writes on an ordered rail wait for the immediate that counts them
    // (the provider's queue was full): the ABORT lets the receiver reuse the blocks, so it waits until the copy
    // landed and those writes are counted, or a late byte could overwrite the next request's KV there.
    deferred_aborts_.push_back(owner);
    counters_.aborts_deferred++;
  }
}

// The ABORT tells the receiver how many granules to count before it may reuse the slot and the blocks; a failed
// send posts nothing after it, so the total is final.
void Agent::queue_abort(SendState& send) {
  ControlMessage total;  // only its two count fields: the 64-bit total, encoded the way on_abort decodes it
  total.set_posted_total(send.granules_posted);
  queue_control(*send.peer, ControlType::Abort, send.xfer_id, send.slot,
                closing_ ? kAbortClosing : send.peer->abort_code, total.num_layers, total.granules_per_layer);
}

bool Agent::copies_landed(const SendState& send) {
  for (const auto& c : send.ready) {
    if (c.cma && !c.cma->done()) return false;
    if (c.ticket && send.copy_device >= 0 && !copy_over(send.copy_device, c.ticket)) return false;
  }
  for (const auto& op : staged_) {
    if (op.send.get() != &send) continue;
    if (op.cma && !op.cma->done()) return false;
    // A copy-in into a bounce slot still reads the send's source blocks.
    if (op.ticket && send.copy_device >= 0 && !copy_over(send.copy_device, op.ticket)) return false;
  }
  return true;
}

void Agent::drain_locally(const std::shared_ptr<SendState>& send) {
  std::lock_guard<std::mutex> lock(draining_mu_);
  draining_.push_back(send);
  has_draining_ = true;
}

// A failed send to a lost peer gets no ABORT_ACK: its writes are over once every op it posted completed here and
// every copy it started landed (its source blocks are then read no more).
bool Agent::settle_draining() {
  if (!has_draining_.load(std::memory_order_acquire)) return false;
  std::vector<std::shared_ptr<SendState>> todo;
  {
    std::lock_guard<std::mutex> lock(draining_mu_);
    todo.swap(draining_);
  }
  bool any = false;
  std::vector<std::shared_ptr<SendState>> keep;
  for (auto& s : todo) {
    if (s->ops_completed == s->ops_posted && copies_landed(*s)) {
      s->writes_over = true;
      any = true;
    } else {
      keep.push_back(std::move(s));
    }
  }
  std::lock_guard<std::mutex> lock(draining_mu_);
  for (auto& s : keep) draining_.push_back(std::move(s));
  has_draining_ = !draining_.empty();
  return any;
}

void Agent::begin_goodbye() {
  closing_ = true;
  // An ABORT behind a copy still running into the peer goes once the copy landed; its BYE waits for it, briefly
  // (the destructor waits 250 ms in all).
  const auto until = Clock::now() + kByeWaitsForAborts;
  std::vector<std::shared_ptr<PeerState>> peers;
  {
    std::lock_guard<std::mutex> lock(peers_mu_);
    // Not only connected peers: one whose HELLO to us is still on its way may already count us as connected (it
    // had ours) and be waiting on us; its BYE goes once the HELLO arrived (messages wait for it), within the limit.
    for (auto& [epoch, peer] : peers_by_epoch_)
      if (!peer->lost) peers.push_back(peer);
  }
  for (auto& peer : peers) {
    fail_sends_to(*peer, ErrorKind::PeerLost, "the local agent was closed");
    goodbye_pending_.push_back({peer, kByeClosed, until});
  }
  queue_goodbyes();
}

void Agent::fail_sends_to(PeerState& peer, ErrorKind kind, const std::string& why) {
  std::vector<std::shared_ptr<SendState>> sends;
  {
    std::lock_guard<std::mutex> lock(peer.mu);
    for (auto& [id, s] : peer.live_sends) sends.push_back(s);
  }
  for (auto& s : sends) fail_send(s, kind, why);  // an ABORT with its total (deferred behind a running copy)
}

void Agent::end_peer_now(const std::shared_ptr<PeerState>& peer, ErrorKind kind, const std::string& why,
                         ByeReason reason, bool totals_received) {
  if (peer->lost) return;  // ended already (its own BYE came first, or end_live_peer stopped waiting)
  peer->abort_code = abort_code_of(reason);
  fail_sends_to(*peer, kind, why);
  peer->farewell = true;
  mark_peer_lost(*peer, kind, why, /*writes_over_now=*/false, totals_received);
  goodbye_pending_.push_back({peer, reason, Clock::now() + kByeWaitsForAborts});
  queue_goodbyes();
}

bool Agent::queue_goodbyes() {
  size_t keep = 0;
  bool any = false;
  const auto now = Clock::now();
  for (auto& bye : goodbye_pending_) {
    const bool deferred = std::any_of(deferred_aborts_.begin(), deferred_aborts_.end(),
                                      [&](const auto& s) { return s->peer == bye.peer; });
    if (deferred && now < bye.until) {
      goodbye_pending_[keep++] = std::move(bye);
      continue;
    }
    // After this peer's ABORTs in the outbox (one order per peer): with none deferred, every total went before it.
    queue_control(*bye.peer, ControlType::Bye, bye.reason, 0, 0, deferred ? 0 : kByeTotalsSent);
    any = true;
  }
  goodbye_pending_.resize(keep);
  return any;
}

bool Agent::flush_deferred_aborts() {
  if (deferred_aborts_.empty()) return false;
  size_t keep = 0;
  bool any = false;
  for (auto& s : deferred_aborts_) {
    if (!abort_may_go(*s)) {
      deferred_aborts_[keep++] = std::move(s);
      continue;
    }
    if (!s->peer->lost || s->peer->farewell) queue_abort(*s);
    any = true;
  }
  deferred_aborts_.resize(keep);
  return any;
}

void Agent::mark_peer_lost(PeerState& peer, ErrorKind kind, const std::string& why, bool writes_over_now,
                           bool totals_sent) {
  std::vector<std::shared_ptr<SendState>> sends;
  std::vector<std::shared_ptr<RecvState>> recvs, settled;
  {
    std::lock_guard<std::mutex> lock(peer.mu);
    if (peer.lost.exchange(true)) return;
    peer.lost_reason = why;
    peer.lost_at = Clock::now();
    for (auto& [id, s] : peer.live_sends) sends.push_back(s);
    for (auto& [slot, s] : peer.quarantined) drain_locally(s);  // their ABORT_ACK will never come
    peer.quarantined.clear();
    peer.slot_waiters.clear();  // among the live sends: they fail below, having posted nothing
    recvs = peer.unsettled_recvs();  // the failed and cancelled ones among them: only writes_over is left
    if (!writes_over_now && totals_sent) {
      settled = settle_by_totals(peer, recvs);  // recvs keeps the rest, settled as before (process seen gone)
    } else if (!peer.farewell) {
      peer.slots.for_each([](SlotCounter& slot) { slot.watchers.clear(); });
    }  // else we are ending it: its slots keep watching until its answer says its totals (on_bye)
    peer.live_sends.clear();
    peer.live_recvs.clear();
    peer.waiting_recvs.clear();
    peer.cancelled_recvs.clear();
    if (!writes_over_now) peer.removed_recvs = recvs;
  }
  if (std::this_thread::get_id() == progress_.get_id()) drain_landings(peer);
  for (auto& s : sends) {
    s->aborted = true;
    if (s->fail(kind, why)) drain_locally(s);
  }
  for (auto& r : recvs) {
    if (writes_over_now) r->writes_over = true;  // the sender's process is gone: it posts nothing more
    r->fail(kind, why);
  }
  for (auto& r : settled) {
    r->writes_over = true;
    r->fail(kind, why);
  }
}

// A closing peer sent an ABORT with its posted total for every transfer that had a slot here, then its BYE (peer.mu
// held). A recv no slot watches had nothing posted for it (a write belongs to a slot, and the slot's ABORT came
// first): its writes are over now (returned). One that a slot still counts towards such a total stays watched there
// and is told when the count is reached; it and any watched by a slot without a total stay in `recvs`.
std::vector<std::shared_ptr<RecvState>> Agent::settle_by_totals(PeerState& peer,
                                                                std::vector<std::shared_ptr<RecvState>>& recvs) {
  std::vector<std::shared_ptr<RecvState>> now, rest;
  for (auto& r : recvs) {
    bool watched = false;
    peer.slots.for_each([&](const SlotCounter& s) { watched = watched || s.watches(r) || s.recv == r; });
    (watched ? rest : now).push_back(r);
  }
  peer.slots.for_each([](SlotCounter& s) {
    if (!(s.aborted && s.abort_total_known)) s.watchers.clear();
  });
  recvs.swap(rest);
  return now;
}

// A removed peer's process that is now gone posts nothing more: its ended recvs' writes are over. So is a fenced
// peer's (its keys closed: release_lost_peer). Otherwise, across hosts nothing says so, and writes_over stays false
// (the blocks of such recvs are for the engine to retire), except for a restarted peer without per-peer keys, whose
// successor is taken to say the old incarnation is over.
void Agent::settle_removed_recvs(PeerState& peer) {
  std::vector<std::shared_ptr<RecvState>> settled;
  {
    std::lock_guard<std::mutex> lock(peer.mu);
    if (peer.removed_recvs.empty()) return;
    if (!peer.settle_removed_now && !peer.fenced &&
        (!peer.same_host || !process_gone(static_cast<pid_t>(peer.info.pid))))
      return;
    settled.swap(peer.removed_recvs);
  }
  drain_landings(peer);  // its batches still copying into a GPU pool land first (this is the progress thread)
  for (auto& r : settled) r->writes_over = true;
}

void Agent::check_deadlines() {
  const auto now = Clock::now();
  bool watching = !active_sends_.empty();  // something whose deadline or end must be seen within kLiveCheck
  for (auto& send : active_sends_) {
    if (send->state() == TransferState::Pending && now >= send->deadline) {
      fail_send(send, ErrorKind::TransferTimeout,
                "transfer " + std::to_string(send->xfer_id) + " to peer '" + send->peer->info.name +
                    "' missed its deadline: " + describe_progress(*send) + ", receiver confirmation " +
                    (send->released ? "received" : "missing") +
                    (send->layers_posted < send->num_layers ? " (were all layers marked ready?)" : ""));
    }
  }
  std::vector<std::shared_ptr<PeerState>> peers;
  {
    std::lock_guard<std::mutex> lock(peers_mu_);
    for (auto& [epoch, p] : peers_by_epoch_) peers.push_back(p);
    forget_ended_associations();
    peers.insert(peers.end(), ended_associations_.begin(), ended_associations_.end());
  }
  for (auto& p : peers) fail_slot_waiters_past_deadline(*p, now);
  heartbeat(peers, now);
  const std::vector<bool> gone = same_host_peers_gone(peers);
  for (size_t i = 0; i < peers.size(); ++i) {
    auto& p = peers[i];
    if (p->lost) {
      release_lost_peer(*p);
      settle_removed_recvs(*p);
      continue;
    }
    // A same-host peer whose process is gone is lost now, not at its transfers' deadlines.
    if (gone[i]) {
      mark_peer_lost(*p, ErrorKind::PeerLost, "peer '" + p->info.name + "' (pid " + std::to_string(p->info.pid) +
                                                  ") exited; transfers with it can never complete");
      continue;
    }
    std::vector<std::pair<std::shared_ptr<RecvState>, std::string>> expired;
    {
      std::lock_guard<std::mutex> lock(p->mu);
      watching |= !p->live_recvs.empty() || !p->slot_waiters.empty() || !p->cancelled_recvs.empty();
      for (auto it = p->live_recvs.begin(); it != p->live_recvs.end();) {
        if (now >= it->second->deadline) {
          auto s = p->slot_of_xfer.find(it->first);
          expired.emplace_back(it->second, s == p->slot_of_xfer.end()
                                               ? std::string("nothing of it arrived: no BEGIN, no data")
                                               : describe_arrival(p->slots[s->second], *it->second));
          p->waiting_recvs.erase(it->first);
          if (s != p->slot_of_xfer.end()) p->slots[s->second].recv.reset();
          it = p->live_recvs.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (auto& [r, arrival] : expired)
      r->fail(ErrorKind::TransferTimeout,
              "transfer " + std::to_string(r->xfer_id) + " from peer '" + p->info.name + "' did not fully arrive by its deadline (" +
                  std::to_string(r->layers_done()) + "/" + std::to_string(r->num_layers) + " layers complete; " +
                  arrival + ")");
  }
  auto next = now + (watching ? kLiveCheck : std::chrono::milliseconds(kIdleCheckMs));
  if (options_.peer_timeout_s > 0) next = std::min(next, next_heartbeat_);  // the next PINGs go out on time
  next_deadline_check_ = next;
}

// An ended association (its incarnation added again) is forgotten once nothing of it is left to do here: released
// (connection closed, keys closed) and every recv it ended settled. peers_mu_ held.
void Agent::forget_ended_associations() {
  ended_associations_.erase(std::remove_if(ended_associations_.begin(), ended_associations_.end(),
                                           [](const std::shared_ptr<PeerState>& p) {
                                             std::lock_guard<std::mutex> lock(p->mu);
                                             return p->transport_released && p->removed_recvs.empty();
                                           }),
                            ended_associations_.end());
}

// A lost peer (removed, restarted, closed, gone) keeps no connection: its socket or queue pair, and the mapping of its
// doorbell rings, would otherwise stay for the agent's lifetime, one per peer ever removed (fds run out after ~1000
// peers come and go). Released once nothing of ours can still need them: no message to it left in the outbox (the
// BYE went out), no write or copy of a send to it in flight, and a grace period for the provider to deliver what
// it accepted.
void Agent::release_lost_peer(PeerState& peer) {
  const auto& caps = transport_->capabilities();
  if (peer.transport_released || !caps.releases_peers || (caps.releases_connected_peers_only && !peer.connected))
    return;
  Clock::duration lost_for;
  {
    std::lock_guard<std::mutex> lock(peer.mu);
    lost_for = Clock::now() - peer.lost_at;
  }
  if (lost_for < kReleaseLostPeerAfter) return;
  // A farewell posted late (the peer's HELLO came only now: it was ended before it connected) gets the same grace
  // as one posted when the peer was lost, so closing the connection does not overtake it.
  const bool farewell_in_flight = peer.farewell_posted_at != Clock::time_point{} &&
                                  Clock::now() - peer.farewell_posted_at < kReleaseLostPeerAfter;
  if (farewell_in_flight) return;
  const bool given_up = lost_for >= kFarewellGivesUpAfter;
  const bool farewell_pending = has_messages_to(peer);
  if (farewell_pending && !given_up) return;
  for (const auto& op : staged_)  // copies into our bounce slots: they finish here, whatever the peer does
    if (op.send->peer.get() == &peer) return;
  if (!given_up) {
    for (const auto& s : active_sends_)
      if (s->peer.get() == &peer && s->ops_completed != s->ops_posted) return;
    std::lock_guard<std::mutex> lock(draining_mu_);
    for (const auto& s : draining_)
      if (s->peer.get() == &peer) return;
  }
  if (farewell_pending) drop_messages_to(peer);
  transport_->remove_peer(peer.addr);  // the progress thread holds transport_mu_ here
  // Its keys close after its connection: whatever it still writes, now or over a new connection, is refused. Only
  // a peer on another host has no other way in (a same-host one may write by CMA or CUDA IPC, without keys).
  close_peer_keys(peer);
  if (caps.fences_peers && !peer.same_host) {
    peer.fenced = true;
    counters_.peers_fenced++;
  }
  peer.doorbell.reset();
  if (peer.pidfd >= 0) {  // lost peers are not polled (settle_removed_recvs uses kill() and /proc)
    close(peer.pidfd);
    peer.pidfd = -1;
  }
  peer.transport_released = true;
  counters_.peers_released++;
}

// Every peer_timeout_s / 4 a PING to each connected peer; a connected peer that sent nothing at all (no message,
// write or PING) for peer_timeout_s is ended like a removed one (BYE saying why, its transfers fail with PeerLost):
// a host that lost power or its network sends no FIN, and without this only each transfer's deadline noticed,
// while an idle peer looked healthy for hours (TCP keepalive). Peers that never PING (heartbeat_ms 0) are not
// judged; a peer whose interval is long gets 4 of them.
void Agent::heartbeat(const std::vector<std::shared_ptr<PeerState>>& peers, Clock::time_point now) {
  if (options_.peer_timeout_s <= 0) return;
  const auto interval = std::chrono::milliseconds(info_.heartbeat_ms);
  // A check that came late means this process stalled (stopped, swapped, starved): it cannot tell who went silent
  // meanwhile, so everyone starts over from now. Checks come at least every interval (check_deadlines schedules
  // the next PING), so only a stall makes the gap this long.
  const auto late = interval + 2 * std::chrono::milliseconds(kIdleCheckMs);
  const bool stalled = last_heartbeat_check_ != Clock::time_point{} && now - last_heartbeat_check_ > late;
  last_heartbeat_check_ = now;
  const bool ping = now >= next_heartbeat_;
  if (ping) next_heartbeat_ = now + interval;
  const int64_t now_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(now.time_since_epoch()).count();
  for (const auto& p : peers) {
    if (p->lost || !p->connected) continue;
    if (ping) {
      queue_control(*p, ControlType::Ping, 0, 0);
      counters_.heartbeats_sent++;
    }
    if (p->heard != p->heard_seen || stalled || p->last_heard_ns.load(std::memory_order_relaxed) == 0) {
      p->heard_seen = p->heard;
      p->last_heard_ns.store(now_ns, std::memory_order_relaxed);
      continue;
    }
    if (p->info.heartbeat_ms == 0) continue;
    const double limit = std::max(options_.peer_timeout_s, 4.0 * p->info.heartbeat_ms / 1000.0);
    const double silent = static_cast<double>(now_ns - p->last_heard_ns.load(std::memory_order_relaxed)) / 1e9;
    if (silent < limit) continue;
    counters_.peers_silent++;
    std::ostringstream why;
    why.precision(3);
    why << "peer '" << p->info.name << "' sent nothing for " << silent << " s (no heartbeat, message or write; "
        << "peer_timeout_s=" << limit << "): its host may be down or cut off, or its process stopped or starved; "
        << "transfers with it ended";
    end_live_peer(p, ErrorKind::PeerLost, why.str(), kByeSilent);
  }
}

// Which live same-host peers' processes are gone: one poll() over their pidfds (this runs every 10 ms; reading
// /proc/<pid>/stat for each peer cost ~10 us apiece, a quarter of a core for 256 same-host peers), kill() and
// /proc for peers without one.
std::vector<bool> Agent::same_host_peers_gone(const std::vector<std::shared_ptr<PeerState>>& peers) {
  std::vector<bool> gone(peers.size(), false);
  std::vector<pollfd> fds;
  std::vector<size_t> owner;
  for (size_t i = 0; i < peers.size(); ++i) {
    const PeerState& p = *peers[i];
    if (!p.same_host || p.lost) continue;
    if (p.pidfd >= 0) {
      fds.push_back({p.pidfd, POLLIN, 0});
      owner.push_back(i);
    } else {
      gone[i] = process_gone(static_cast<pid_t>(p.info.pid));
    }
  }
  if (!fds.empty() && ::poll(fds.data(), fds.size(), 0) > 0)
    for (size_t k = 0; k < fds.size(); ++k) gone[owner[k]] = fds[k].revents != 0;
  return gone;
}

// A send still waiting for a slot at its deadline never started: the message says what held the window.
void Agent::fail_slot_waiters_past_deadline(PeerState& peer, Clock::time_point now) {
  std::vector<std::shared_ptr<SendState>> expired;
  std::string held;
  {
    std::lock_guard<std::mutex> lock(peer.mu);
    for (const auto& s : peer.slot_waiters)
      if (now >= s->deadline) expired.push_back(s);
    if (expired.empty()) return;
    held = "all " + std::to_string(peer.tx_window_slots) + " slots of the window peer '" + peer.info.name +
           "' gave this agent stayed taken (" + std::to_string(peer.live_sends.size() - peer.slot_waiters.size()) +
           " transfers in flight, " + std::to_string(peer.quarantined.size()) +
           " failed ones whose posted writes it has not all counted yet, " + std::to_string(peer.slot_waiters.size()) +
           " waiting)";
  }
  for (auto& s : expired)
    fail_send(s, ErrorKind::TransferTimeout,
              "transfer " + std::to_string(s->xfer_id) + " to peer '" + peer.info.name +
                  "' missed its deadline waiting for a transfer slot, nothing of it sent: " + held +
                  "; finish or fail transfers sooner, give it a longer timeout, or have the peer use fewer max_peers "
                  "(a larger window each)");
}

// "2/2 layers marked, 1/2 posted, 3/4 writes complete": where a send stood when it ended early.
std::string Agent::describe_progress(const SendState& send) {
  uint32_t marked = 0;
  for (uint32_t i = 0; i < send.num_layers; ++i) marked += send.marked[i].load(std::memory_order_relaxed);
  return std::to_string(marked) + "/" + std::to_string(send.num_layers) + " layers marked, " +
         std::to_string(send.layers_posted) + "/" + std::to_string(send.num_layers) + " posted, " +
         std::to_string(send.ops_completed - send.rail_signals_completed) + "/" +
         std::to_string(send.ops_expected - send.rail_signals) + " writes complete";
}

// What a recv that timed out got, so a log line tells a sender that never started from one whose last layer never
// came or came in part: "BEGIN received; layer 1: 0/8 granules".
std::string Agent::describe_arrival(const SlotCounter& slot, const RecvState& recv) {
  if (!slot.begun) return "no BEGIN from the sender; " + std::to_string(slot.seen) + " granules arrived before it";
  std::string out = "BEGIN received";
  int listed = 0;
  for (uint32_t l = recv.first_layer; l < recv.first_layer + recv.num_layers && listed < 4; ++l) {
    const uint32_t got = l < slot.counts.size() ? slot.counts[l] : 0;
    if (got >= recv.granules_per_layer) continue;
    out += "; layer " + std::to_string(l) + ": " + std::to_string(got) + "/" +
           std::to_string(recv.granules_per_layer) + " granules";
    ++listed;
  }
  return out;
}

}  // namespace kvxfer
