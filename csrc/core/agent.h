// Agent: one per process. Owns the transport, registered pools, peers and the progress thread.
//
//   metadata()            caller thread; bytes for the peer (never blocks)
//   register_pool()       caller thread; registers once per pool, errors here and not at the first transfer
//   add_peer(bytes)       caller thread; parses defensively, picks the path (cma or fabric), sends HELLO
//   send(...)             caller thread; builds the WritePlan in C++, takes a slot; posts nothing yet
//   layer_ready(send, l)  caller thread; queues layer l for posting and returns in microseconds
//   recv(...)             caller thread; registers the expectation; may come before or after the data
//   progress thread       posts writes within a bounded window, polls the CQ, counts immediates, handles control
//                         messages, enforces deadlines and peer liveness. Never touches Python.
#pragma once
#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "core/control.h"
#include "core/metadata.h"
#include "core/peer.h"
#include "core/transfer.h"
#include "gpu/cuda_device.h"
#include "transports/host_ipc/cma_workers.h"
#include "transports/host_ipc/doorbell.h"
#include "transports/staged/staging_ring.h"
#include "transports/transport.h"

namespace kvxfer {

struct AgentOptions {
  std::string name = "kvxfer";
  std::string transport = "auto";  // auto | shm | cma | tcp | fi_shm | efa | verbs
  std::string interface;           // network interface for IP providers ("lo" in tests); empty = any
  double default_timeout_s = 60.0;
  uint32_t rails = 1;              // fabric endpoints to spread writes over (multi-rail; 1-16)
  std::string staging = "auto";    // auto: stage only GPU sources the fabric cannot read; always: every send
                                   // goes through the bounce slots (tests and benchmarks of the staged pipeline)
  uint64_t staging_slot_bytes = StagingRing::kDefaultSlotBytes;
  uint32_t staging_slots = StagingRing::kDefaultSlots;
  int cma_threads = -1;            // threads for large same-host copies; 0/1: the progress thread; -1: from
                                   // KVXFER_CMA_THREADS, else half the CPUs (1 to 4)
  bool doorbell = true;            // same-host peers signal through shared memory, not the fabric (doorbell.h)
  std::string landing = "auto";    // auto: GPU pools the fabric cannot write are reached through landing slots,
                                   // and host pools of small chunks on a tcp fabric offer them (PoolInfo::
                                   // landing_offered); needed: only the former; always: every pool (tests, benchmarks)
  uint32_t landing_slots = 4;      // landing slots per sending peer (transports/staged/landing.h)
  uint64_t landing_slot_bytes = 256u << 10;
  // Peers this agent can hold at once (a power of two, 1..1024): each gets a window of kMaxSlots / max_peers
  // transfers in flight towards us (core/imm.h), so more peers means fewer transfers in flight per peer.
  uint32_t max_peers = ImmCode::kDefaultMaxPeers;
  // A connected peer we hear nothing from (message, write or PING) for this long is lost: its host may be down or
  // partitioned, or its process stalled. PINGs go out every peer_timeout_s / 4. 0: no heartbeat.
  double peer_timeout_s = 30.0;
};

// The path a send from one of our pools to one of a peer's pools would take, and why (what it costs).
struct PathChoice {
  SendPath path = SendPath::Fabric;
  std::string reason;
  bool staged_to_cma = false;
  bool landing = false;  // Staged into the peer's landing slots (its pool is not written directly)
  int copy_device = -1;
};

struct LocalRegion {
  uint64_t addr = 0;
  uint64_t nbytes = 0;
  int device = -1;  // -1 host; >= 0 CUDA device
};

struct LocalPool {
  std::string name;
  LayoutSpec layout;
  std::vector<LocalRegion> regions;
  std::vector<MemoryKey> keys;  // [regions] fabric registrations (empty handle: GPU memory the fabric cannot register)
  bool on_gpu = false;          // every region is CUDA memory (pools never mix host and device regions)
  bool landing = false;         // peers write it through our landing slots (PoolInfo::landing)
  bool landing_offered = false; // ... or may, when their chunks are small (PoolInfo::landing_offered)
  std::vector<gpu::VmmPiece> vmm_exports;  // VMM regions' exported handles (fds stay open while the agent lives)
  int device = -1;              // the CUDA device of a GPU pool
};

struct AgentStats {
  uint64_t writes_posted = 0, imms_received = 0, eagain = 0, dropped_messages = 0, unknown_imms = 0;
  uint64_t slots_reclaimed = 0;   // sender: slots of failed transfers handed back by the receiver
  uint64_t sends_waited_for_slot = 0;  // sender: sends made while the peer's whole window was in flight
  uint64_t peers_released = 0;    // lost peers whose connection the transport closed (release_lost_peer)
  uint64_t peers_fenced = 0;      // released peers whose keys were closed: nothing they post can land here
  uint64_t heartbeats_sent = 0;   // PINGs queued to connected peers
  uint64_t peers_silent = 0;      // peers lost because nothing came from them for peer_timeout_s
  uint64_t slot_violations = 0;   // receiver: an aborted slot got more granules than its sender posted
  uint64_t idle_waits = 0;        // times the progress thread blocked on its CQ fds (0: it never does)
  uint64_t cma_jobs = 0;          // CMA copies run in parallel on the worker threads
  uint64_t aborts_deferred = 0;   // failed sends whose ABORT waited for a copy into the peer to land
  uint64_t doorbell_sent = 0;     // entries (immediates and control messages) put into same-host peers' rings
  uint64_t doorbell_received = 0; // entries taken from our rings
  uint64_t doorbell_wakes = 0;    // entries after which we woke a blocked peer (its eventfd)
  uint64_t landings = 0;          // receiver: batches copied from landing slots into a pool
  uint64_t landing_rejected = 0;  // receiver: landing batches refused (malformed header, out-of-bounds entry)
  uint64_t gpu_layer_launches = 0; // cuda_ipc: gather kernels that carried one or more layers and marked each landed
  uint64_t ipc_pools_mapped = 0;   // cuda_ipc: peers' GPU pools mapped into this process (at add_peer, or first send)
  uint64_t landing_waits = 0;     // sender: times a batch waited for a free landing slot of its peer
  uint64_t imm_writes = 0;        // sender: zero-byte writes that counted the plain writes before them (ordered rails)
  std::vector<RailStats> rails;
};

class Agent {
 public:
  explicit Agent(AgentOptions options);
  ~Agent();
  Agent(const Agent&) = delete;
  Agent& operator=(const Agent&) = delete;

  std::vector<uint8_t> metadata() const;
  uint32_t register_pool(const std::string& name, const LayoutSpec& layout, const std::vector<LocalRegion>& regions);
  std::shared_ptr<PeerState> add_peer(const uint8_t* data, size_t nbytes);
  // drain_s > 0: first cancel the recvs from the peer and abort the sends to it, and wait (at most drain_s, without
  // the GIL) until their writes are over, so the ended transfers' blocks are known free even for a live peer on
  // another host; then the BYE.
  void remove_peer(const std::shared_ptr<PeerState>& peer, double drain_s = 0.0);
  // Ends a peer just added that this agent will not talk to (`why` says why, here): like remove_peer, but its BYE
  // says "refused", and it waits for the peer's HELLO (a few seconds at most) when the peer has not added us yet,
  // so the peer's transfers with us fail naming the refusal instead of waiting out its handshake.
  void refuse_peer(const std::shared_ptr<PeerState>& peer, const std::string& why);
  // Blocks (without the GIL) until the peer's HELLO arrived; throws TransferTimeout.
  void wait_connected(const std::shared_ptr<PeerState>& peer, double timeout_s);

  // num_tokens: the request's tokens (0: every token of the blocks; needed when the pools' block sizes differ).
  std::shared_ptr<SendState> send(const std::shared_ptr<PeerState>& peer, uint64_t xfer_id, uint32_t src_pool,
                                  const std::string& dst_pool, const int32_t* src_ids, size_t n_src,
                                  const int32_t* dst_ids, size_t n_dst, uint32_t num_tokens, int first_layer,
                                  int num_layers, double timeout_s);
  void layer_ready(const std::shared_ptr<SendState>& send, int layer);   // layer < 0: every layer not yet marked
  // Gives up on a send (the model failed mid-prefill, the request was cancelled): nothing more is posted, the send
  // fails with TransferFailed and the receiver's recv fails too (ABORT). No-op on a send that already ended. Writes
  // already posted may still complete afterwards: there is no drain handshake yet.
  void abort_send(const std::shared_ptr<SendState>& send, const std::string& why);
  // src_pool names the peer's pool the data comes from (empty: its first): with pools of different TP ranks the
  // count the recv expects depends on the heads both hold.
  std::shared_ptr<RecvState> recv(const std::shared_ptr<PeerState>& peer, uint64_t xfer_id, uint32_t dst_pool,
                                  const int32_t* dst_ids, size_t num_ids, int first_layer, int num_layers,
                                  double timeout_s, const std::string& src_pool = "", uint32_t num_tokens = 0);
  // The receiver gives up on a transfer (the request was aborted or preempted): a pending recv fails with Cancelled
  // at once and the sender is told (CANCEL) to post nothing more; writes_over turns true once nothing it posted can
  // still land. Also useful on a recv that already failed here (timed out) while the sender may still write. No-op
  // on a recv that completed or whose writes are over.
  void cancel_recv(const std::shared_ptr<PeerState>& peer, const std::shared_ptr<RecvState>& recv,
                   const std::string& why);

  // Testing: deliver an immediate or a control message as if `peer` had sent it, on the progress thread. Lets
  // tests force orders the loopback providers never produce (BEGIN after data, reversed and split granules).
  void inject_imm(const std::shared_ptr<PeerState>& peer, uint32_t imm);
  // Testing: put `bytes` into the peer's landing slot `index`, then deliver a landing immediate for transfer slot
  // `slot` as if the peer had written them (malformed or out-of-bounds headers).
  void inject_landing(const std::shared_ptr<PeerState>& peer, uint32_t slot, uint32_t index, std::vector<uint8_t> bytes);
  // Landing ring state for info/tests: {slot_bytes, slots per peer, pinned} or zeros when no pool needs one; the
  // last refused landing batch's reason.
  std::vector<uint64_t> landing_info() const;
  std::string last_landing_error() const;
  void inject_begin(const std::shared_ptr<PeerState>& peer, uint64_t xfer_id, uint32_t slot, uint32_t first_layer,
                    uint32_t num_layers, uint32_t granules_per_layer);
  // Tests: bytes handled exactly as a control message read from the wire or a doorbell ring (any length).
  void inject_wire_message(std::vector<uint8_t> bytes);
  // Tests: the next n landing batches this agent sends name a place past the end of the peer's pool (their
  // receiver refuses them), as a sender with a bug would.
  void corrupt_next_landing_batches(uint32_t n) { corrupt_landing_batches_.store(n); }

  const AgentInfo& info() const { return info_; }
  const Capabilities& capabilities() const { return transport_->capabilities(); }
  const AgentOptions& options() const { return options_; }
  uint32_t window_slots() const { return window_slots_; }  // transfers each peer may have in flight towards us
  unsigned cma_threads() const { return cma_threads_; }  // 0: large CMA copies run on the progress thread
  // Same-host peers can signal us through shared memory; otherwise why not (empty when they can).
  bool has_doorbell() const { return doorbell_ != nullptr; }
  const std::string& doorbell_unavailable() const { return doorbell_why_; }
  AgentStats stats() const;
  // How many of this agent's transfers have ended so far, and a wait (without the GIL) until that changes from
  // `seen` or timeout_s passes: an engine with many transfers open sleeps until one ends instead of polling.
  uint64_t ended_count() const { return ends_->count(); }
  bool wait_ended(uint64_t seen, double timeout_s) { return ends_->wait_changed(seen, timeout_s); }
  // The path send() would take from local pool src_pool to the peer's pool dst_pool; throws TransportUnavailable
  // when no path can reach it, with what to change.
  // layer_bytes: what one layer of the transfer moves (a small transfer is not packed; unknown: as if large).
  PathChoice choose_path(const PeerState& peer, uint32_t src_pool, uint32_t dst_pool,
                         uint64_t layer_bytes = UINT64_MAX) const;
  // Staging ring state for info/tests: {slot_bytes, slots, pinned} or zeros before the first staged send.
  std::vector<uint64_t> staging_info() const;

 private:
  struct OpContext {
    alignas(16) uint8_t transport[Transport::kContextBytes];  // the provider's per-op space (fi_context2)
    SendState* send = nullptr;
    int staging_slot = -1;  // a staged write: the bounce slot to hand back when it completes
    uint64_t nbytes = 0;    // a direct fabric write: its bytes, in flight until it completes (bytes_in_flight)
    bool counts_rail = false;  // the zero-byte write that counts a rail's writes (signal_rail)
  };
  // A batch of one layer's writes in a bounce slot: copied in (ticket), then written out from the slot.
  struct StagedOp {
    std::shared_ptr<SendState> send;
    int slot;
    uint32_t layer, first_write, num_writes, granules;
    uint64_t ticket;    // copy-in event (0: a host copy, already done)
    bool copied_out;    // CMA destination: the bytes are in the peer, the zero-byte immediate is still to post
    uint64_t bytes;     // data bytes of the batch
    std::shared_ptr<CmaJob> cma = nullptr;  // CMA destination: the copy-out running on the workers
  };
  struct Command {
    enum class Kind { NewSend, LayerReady, Control, InjectImm, InjectMessage, AbortSend, InjectLanding, CancelRecv,
                      Goodbye, EndPeer } kind;
    std::shared_ptr<SendState> send;
    uint32_t layer_index = 0;  // LayerReady: index within the send's layer range
    std::shared_ptr<PeerState> peer;
    ControlMessage msg;
    std::string reason{};  // AbortSend, EndPeer (why, for the failed transfers)
    std::vector<uint8_t> bytes{};  // InjectLanding; InjectMessage with `wire`: the raw message
    bool wire = false;
    std::shared_ptr<RecvState> recv{};  // CancelRecv
  };
  // A landing batch whose copy into a GPU pool is in flight; counted and handed back once the copy landed.
  struct PendingLanding {
    std::shared_ptr<PeerState> peer;
    uint32_t imm;        // what to count: (transfer slot, layer, granules)
    uint32_t index;      // landing slot to hand back (LANDED)
    int device;
    uint64_t ticket;
  };

  static uint32_t peer_pool_index(const PeerState& peer, const std::string& name);
  uint32_t granules_from(const PeerState& peer, const std::string& src_pool, const LayoutSpec& dst,
                         const int32_t* dst_ids, size_t n, uint32_t num_tokens) const;
  PathChoice landing_choice(const PeerState& peer, const PoolInfo& dst, const std::string& src_where,
                            const std::string& slots, const std::string& because, PathChoice c) const;
  bool offers_landing(const LayoutSpec& layout, bool on_gpu) const;

  void post_command(Command c);
  void say_goodbye(std::chrono::milliseconds limit);  // destructor: BYE to every connected peer, bounded
  static Command bye_command(const std::shared_ptr<PeerState>& peer, ByeReason reason);
  void post_commands(std::vector<Command> cmds);
  void end_live_peer(const std::shared_ptr<PeerState>& peer, ErrorKind kind, const std::string& why,
                     ByeReason reason = kByeRemoved);
  void drain_peer(const std::shared_ptr<PeerState>& peer, double drain_s, const std::string& why);

  // progress thread (agent_progress.cpp)
  void progress_loop();
  void place_progress_thread();    // KVXFER_PROGRESS_CPUS (constructor; throws, with the thread joined)
  void wake_progress();            // a command was queued (or the agent stops): end an idle wait
  bool may_block() const;          // nothing to post: only a completion, a message or a command can make work
  bool awaiting_layers() const;    // a live send has layers its caller has not marked ready yet
  void block_until_event(bool retry_soon, bool cq_fds_suspect);
  bool run_commands();
  bool post_pending_writes();
  bool post_send_ops(const std::shared_ptr<SendState>& send, size_t& budget);
  bool post_cma_layer(SendState& send, SendState::Cursor& cur, size_t& budget);
  void cma_ops(const SendState& send, uint32_t first_write, uint32_t n, CmaOp* ops) const;
  void submit_cma_layers(SendState& send, CmaWorkers& workers);
  bool post_signals(SendState& send, SendState::Cursor& cur, uint32_t done_before, size_t& budget);
  bool post_signal(SendState& send, uint32_t imm);  // one zero-byte signal: doorbell or fabric; false = no room
  bool write_signal(SendState& send, uint32_t imm, uint32_t rail, bool counts_rail);  // the fabric's: the signal pad
  int post_on_rails(PeerState& peer, const WriteIov* iov, size_t n, uint32_t imm, OpContext* ctx);
  // Ordered rails (coalesce_imms_): data writes without immediates, then one zero-byte write per rail counting them.
  int post_unsignalled(SendState& send, const WriteIov* iov, size_t n, uint32_t layer, uint32_t granules,
                       OpContext* ctx);
  bool signal_rail(SendState& send, uint32_t rail);  // false: the provider's queue is full, try again later
  bool signal_rails(SendState& send);                // every rail's uncounted writes; false: some are left
  bool poll_doorbell();
  void on_doorbell_items(uint32_t window, const DoorbellItem* items, size_t n);
  void open_doorbell(PeerState& peer);  // add_peer: map a same-host peer's rings, or say why not
  // agent_gpu.cpp: the CUDA IPC and staged paths
  bool post_ipc_layer(SendState& send, SendState::Cursor& cur, size_t& budget);
  void enqueue_ipc_layers(SendState& send, gpu::CopyQueue& queue);
  bool post_staged_layer(const std::shared_ptr<SendState>& send, SendState::Cursor& cur);
  bool advance_staged(size_t& budget);
  bool post_staged_op(StagedOp& op);
  WriteIov landing_iov(const StagedOp& op, uint32_t index) const;
  void write_landing_batch_header(const SendState& send, uint32_t first, size_t n, uint32_t granules,
                                  uint8_t* slot) const;
  void submit_staged_copy_outs(CmaWorkers& workers, const std::vector<size_t>& order);  // order: staged_turn_order
  std::vector<size_t> staged_turn_order() const;
  void release_staging(SendState* send, int slot);
  void share_staging();
  void staged_cma_ops(const StagedOp& op, CmaOp* ops) const;
  gpu::CopyQueue& copy_queue(int device);
  void open_ipc_mappings(PeerState& peer, SendState& send, uint32_t dst_pool);
  std::vector<uint64_t> map_ipc_pool(PeerState& peer, uint32_t dst_pool, int device);
  // Whether the agent of this epoch lives in this process now (its addresses are ours: no CUDA IPC to it).
  static bool lives_in_this_process(uint64_t epoch);
  void premap_ipc_pools(PeerState& peer);  // add_peer (caller thread): map a same-host peer's GPU pools now
  uint64_t count_staged_ops(const SendState& send) const;
  // Caller thread: creates and registers the bounce ring on the first staged send, page-locked for `device` (the
  // source pool's GPU; -1 for host sources), or page-locks the ring a host source made when a GPU source first
  // needs it.
  void ensure_staging(int device);
  size_t staged_pieces(const SendState& send) const;
  // landing (receiver side)
  // transport_mu_ and pools_mu_ held: creates and registers the ring on the first landing pool, page-locked for
  // `device` (the pool's GPU, whose copies drain it; -1 for a host pool), or page-locks it for the first GPU pool.
  void ensure_landing(int device);
  void on_landing(const std::shared_ptr<PeerState>& peer, uint32_t imm);
  uint8_t* landing_slot(uint32_t xfer_slot, uint32_t index) const;  // our slot `index` of xfer_slot's window
  void finish_landing(const std::shared_ptr<PeerState>& peer, uint32_t imm, uint32_t index);
  bool advance_landings();
  void drain_landings(const PeerState& peer);  // progress thread: no copy of the peer's batches still runs
  void on_landed(PeerState& peer, const ControlMessage& m);
  void fail_landing_transfer(PeerState& peer, uint32_t slot, const std::string& why);
  void count_on_aborted_slot(const std::shared_ptr<PeerState>& peer, uint32_t imm);
  bool poll_completions();
  void on_write_done(OpContext* ctx, const std::string* error);
  void on_remote_data(uint32_t imm);
  void count_imm(const std::shared_ptr<PeerState>& peer, uint32_t imm);
  void on_message(const uint8_t* data, size_t nbytes);
  void on_begin(PeerState& peer, const ControlMessage& m);
  void on_release(PeerState& peer, const ControlMessage& m);
  void on_abort(PeerState& peer, const ControlMessage& m);
  void on_abort_ack(PeerState& peer, const ControlMessage& m);
  void on_cancel(PeerState& peer, const ControlMessage& m);
  void on_cancel_ack(PeerState& peer, const ControlMessage& m);
  void cancel_recv_now(PeerState& peer, const std::shared_ptr<RecvState>& recv);
  void watch_cancelled(PeerState& peer, SlotCounter& s, uint64_t xfer_id);  // peer.mu held
  void remember_abandoned(PeerState& peer, uint64_t xfer_id, uint32_t slot);  // peer.mu held
  void maybe_reclaim_aborted(PeerState& peer, uint32_t slot);
  void check_deadlines();
  bool drain_posted_writes(std::chrono::milliseconds limit);  // true when every op context came back
  static std::string describe_arrival(const SlotCounter& slot, const RecvState& recv);
  static std::string describe_progress(const SendState& send);
  void check_slot(PeerState& peer, uint32_t slot);  // called with peer.mu held
  void flush_gpu_direct_writes();  // GPUs whose pools the NIC writes and whose platform does not order those writes
  std::atomic<uint64_t> gpu_direct_flush_devices_{0};
  void fail_send(const std::shared_ptr<SendState>& send, ErrorKind kind, const std::string& why);
  bool copies_landed(const SendState& send);  // no copy of ours still writes into the peer's memory for `send`
  // Where the copies up to `ticket` on `device`'s queue stand. Failed: the queue reported an error at or before it
  // (done() throws for it every time: one failed copy means the context failed); `why` says which. A failed copy
  // writes nothing more, so Done and Failed are both over.
  enum class CopyState { Running, Done, Failed };
  CopyState copy_state(int device, uint64_t ticket, std::string* why = nullptr);
  bool copy_over(int device, uint64_t ticket) { return copy_state(device, ticket) != CopyState::Running; }
  uint64_t record_after_launch(gpu::CopyQueue& queue);  // record(); drains the queue first if that fails
  bool abort_may_go(SendState& send);         // ... and its writes on ordered rails are counted (posts them)
  bool flush_deferred_aborts();
  void drain_locally(const std::shared_ptr<SendState>& send);  // a failed send to a lost peer: see settle_draining
  bool settle_draining();  // progress thread: writes_over for those whose writes and copies all completed here
  void queue_abort(SendState& send);
  CmaWorkers* cma_workers();                  // nullptr when copies run on the progress thread
  // writes_over_now: the peer's process is gone (or replaced), so nothing it posted can still land; false for a
  // peer that was removed while it may live (its recvs' writes_over then waits for the process to be seen gone).
  // totals_sent: its BYE said every transfer of its with a slot here had its ABORT first (kByeTotalsSent), so an
  // ended recv is settled by counting: at once if no slot still waits for its writes, else when that slot's total
  // is counted.
  void mark_peer_lost(PeerState& peer, ErrorKind kind, const std::string& why, bool writes_over_now = true,
                      bool totals_sent = false);
  std::vector<std::shared_ptr<RecvState>> settle_by_totals(PeerState& peer,
                                                           std::vector<std::shared_ptr<RecvState>>& recvs);
  void begin_goodbye();        // progress thread, closing: fail every live send (ABORTs), then the BYEs
  bool queue_goodbyes();       // the BYEs of peers with no ABORT still deferred (or whose wait is over)
  void fail_sends_to(PeerState& peer, ErrorKind kind, const std::string& why);  // each with its ABORT (total)
  // Progress thread: ends a peer that may live on (removed, restarted, silent, or it ended us: kByeAnswer): our
  // sends fail with their ABORT totals, then its BYE says so; its recvs stay watched for its own totals.
  // totals_received: its own BYE (kByeTotalsSent) ended us first, so our recvs from it settle by counting.
  void end_peer_now(const std::shared_ptr<PeerState>& peer, ErrorKind kind, const std::string& why,
                    ByeReason reason, bool totals_received = false);
  void on_bye(const std::shared_ptr<PeerState>& peer, const ControlMessage& m);
  // Another Agent of this process, our peer, is closing its endpoints (its destructor, progress thread stopped):
  // we end it now and never touch its address again (see ~Agent). writes_over: its posted writes all completed.
  void peer_closing_in_this_process(uint64_t epoch, bool writes_over);
  void tell_agents_in_this_process(bool writes_over);  // destructor (peers_mu_ held): the above, for each
  void watch_removed(PeerState& peer, SlotCounter& s, uint64_t xfer_id);  // peer.mu held
  void settle_removed_recvs(PeerState& peer);
  void queue_control(PeerState& peer, ControlType type, uint64_t xfer_id, uint32_t slot, uint32_t first_layer = 0,
                     uint32_t num_layers = 0, uint32_t granules = 0);
  bool flush_control();
  bool has_messages_to(const PeerState& peer) const;  // in the outbox
  void drop_messages_to(const PeerState& peer);      // from the outbox
  void maybe_finish_send(SendState& send);
  std::shared_ptr<PeerState> peer_by_epoch(uint64_t epoch);
  // The association a message from `epoch` addressed to our `link` belongs to (0: the listed one).
  std::shared_ptr<PeerState> association(uint64_t epoch, uint32_t link);
  std::shared_ptr<PeerState> holder_of(const PeerState& peer);  // the shared_ptr listing it (or null)
  OpContext* take_context();
  void return_context(OpContext* ctx);

  AgentOptions options_;
  std::unique_ptr<Transport> transport_;
  AgentInfo info_;
  std::unique_ptr<uint64_t> cma_cookie_;
  std::unique_ptr<uint64_t[]> signal_pad_;  // AgentInfo::signal_addr: registered so zero-byte signals have a target
  MemoryKey signal_key_;
  std::unique_ptr<DoorbellRegion> doorbell_;  // our rings, one per slot window (null: options_.doorbell off, or failed)
  std::string doorbell_why_;
  std::vector<uint32_t> doorbell_rings_;  // windows given to same-host peers, whose rings are polled (progress thread)
  std::vector<std::unique_ptr<LocalPool>> pools_;
  // The transport's domain is single-threaded (libfabric FI_THREAD_DOMAIN: fi_av_insert or fi_mr_reg beside the
  // progress thread's CQ reads and posts is a data race inside the provider). The progress thread holds this while
  // it works (not while it sleeps); callers hold it around their transport calls. Order: transport_mu_ before
  // pools_mu_ or staging_mu_.
  std::mutex transport_mu_;
  mutable std::mutex pools_mu_;
  // Per-peer keys (Capabilities::fences_peers): what peers may write into us, in registration order (signal pad,
  // pools' regions, the landing ring), each with the base key published for it; and the peers holding keys of
  // their own to it (not yet released). Both guarded by transport_mu_.
  struct RemoteWindow { void* addr; size_t nbytes; uint64_t base_key; };
  std::vector<RemoteWindow> remote_windows_;
  std::vector<std::weak_ptr<PeerState>> keyed_peers_;
  void expose_to_peers(void* addr, size_t nbytes, uint64_t base_key);  // transport_mu_ held
  void admit_peer(const std::shared_ptr<PeerState>& peer);
  void forget_refused_peer(const std::shared_ptr<PeerState>& peer);
  void open_peer_keys(PeerState& peer);   // transport_mu_ held: keys for the windows the peer has none for yet
  void close_peer_keys(PeerState& peer);  // transport_mu_ held
  void learn_peer_link(PeerState& peer, uint32_t link);
  void forget_ended_associations();  // peers_mu_ held

  std::mutex peers_mu_;
  // Held through add_peer: its "already added?" check and the insertion are far apart (transport endpoint, CMA probe),
  // so two threads adding the same metadata both created the peer (UCX: two endpoints, and neither connected).
  // Taken before transport_mu_ and peers_mu_; the progress thread never takes it.
  std::mutex add_peer_mu_;
  std::unordered_map<uint64_t, std::shared_ptr<PeerState>> peers_by_epoch_;
  // Lost associations whose incarnation was added again (same epoch, a new link): unlisted by epoch, but still
  // released, their ended recvs still settled (by the peer's answers, its keys closing, its exit), until both are
  // done (check_deadlines). peers_mu_.
  std::vector<std::shared_ptr<PeerState>> ended_associations_;
  struct EarlyHello { uint32_t rails = 0, window_base = 0, window_slots = 0, link = 0; bool window = false; };
  uint32_t links_made_ = 0;  // add_peer_mu_: the last PeerState::link handed out
  std::unordered_map<uint64_t, EarlyHello> early_hellos_;  // HELLOs from peers not added yet, by epoch
  // Receiver side: which peer owns each window of slots (an immediate's slot names its sender), guarded by peers_mu_.
  // window_slots_ = kMaxSlots / options_.max_peers: the size of every window this agent gives out.
  uint32_t window_slots_ = ImmCode::kMaxSlots / ImmCode::kDefaultMaxPeers;
  std::vector<std::weak_ptr<PeerState>> window_owner_;  // [max_peers]
  uint32_t assign_window(const std::shared_ptr<PeerState>& peer);  // peers_mu_ held
  void wait_for_window(PeerState& peer, double timeout_s);
  void grant_slots(PeerState& peer);  // peer.mu held
  void fail_slot_waiters_past_deadline(PeerState& peer, Clock::time_point now);
  void release_lost_peer(PeerState& peer);
  void heartbeat(const std::vector<std::shared_ptr<PeerState>>& peers, Clock::time_point now);
  std::vector<bool> same_host_peers_gone(const std::vector<std::shared_ptr<PeerState>>& peers);

  std::mutex cmd_mu_;
  std::condition_variable cmd_cv_;
  std::shared_ptr<EndSignal> ends_ = std::make_shared<EndSignal>();
  int wake_fd_ = -1;                // eventfd: commands end the progress thread's blocking wait on the CQ fds
  std::vector<int> cq_fds_;         // the transport's wait fds (empty: it has none; idle means short sleeps)
  bool closing_ = false;                    // progress thread: begin_goodbye ran (ABORTs say kAbortClosing)
  bool goodbye_queued_ = false;             // progress thread: the closing agent's BYEs are in the outbox
  // progress thread: BYEs that wait (until `until`) for this peer's ABORTs deferred behind copies still running
  struct PendingBye {
    std::shared_ptr<PeerState> peer;
    ByeReason reason;
    Clock::time_point until;
  };
  std::vector<PendingBye> goodbye_pending_;
  std::atomic<bool> goodbye_sent_{false};   // ... and all left it (handed to the transport or a doorbell ring)
  bool woke_on_cq_ = false;         // the last blocking wait ended because a CQ fd was readable
  uint32_t idle_cq_wakes_ = 0;      // such wakes in a row after which the loop found nothing to do
  std::vector<Command> commands_;
  std::atomic<bool> has_commands_{false};

  // progress-thread-only
  std::vector<std::shared_ptr<SendState>> active_sends_;
  std::vector<std::unique_ptr<OpContext>> contexts_;
  std::vector<OpContext*> free_contexts_;
  std::vector<std::pair<std::shared_ptr<PeerState>, ControlMessage>> outbox_;
  mutable std::mutex staging_mu_;
  std::unique_ptr<StagingRing> staging_;                    // created by the first staged send
  std::deque<StagedOp> staged_;                             // in copy order
  std::unique_ptr<StagingRing> landing_;                    // receiver's landing slots (created with the first
                                                            // landing pool; outlives the copy queues reading it)
  std::deque<PendingLanding> pending_landings_;             // in copy order
  std::string last_landing_error_;                          // guarded by staging_mu_
  std::vector<std::unique_ptr<gpu::CopyQueue>> copy_queues_;  // [device], created on first use
  std::unique_ptr<CmaWorkers> cma_workers_;                 // created on the first large CMA copy
  unsigned cma_threads_ = 0;
  std::vector<std::shared_ptr<SendState>> deferred_aborts_;  // failed sends whose ABORT waits for a copy
  // Bytes the progress thread copies itself per loop turn, over all layers and sends (CMA without workers and staged
  // copy-outs; host copy-ins into bounce slots have a part of their own): between turns it reads messages, so a
  // CANCEL or an abort stops a large all_ready() send within a few milliseconds instead of after the whole request.
  static constexpr uint64_t kCopyBytesPerTurn = uint64_t(8) << 20;
  uint64_t copy_bytes_left_ = 0;                             // what is left of it this turn
  size_t first_send_ = 0;                                    // round robin: the send that posts first this turn
  uint32_t staging_share_ = 0;                               // this turn: bounce slots one staged send may hold
  uint64_t copy_in_share_ = 0;                               // this turn: host bytes one staged send may copy in
  uint64_t copy_in_left_ = 0;                                // this turn: host bytes all staged sends may copy in
  uint64_t turn_ = 0;                                        // post_pending_writes calls so far
  std::mutex draining_mu_;                                   // mark_peer_lost may run on a caller's thread
  std::vector<std::shared_ptr<SendState>> draining_;         // failed sends to lost peers, not yet drained here
  std::atomic<bool> has_draining_{false};
  Clock::time_point next_deadline_check_;
  Clock::time_point next_heartbeat_, last_heartbeat_check_;  // progress thread
  struct Counters {
    std::atomic<uint64_t> writes_posted{0}, imms_received{0}, eagain{0}, dropped_messages{0}, unknown_imms{0};
    std::atomic<uint64_t> slots_reclaimed{0}, slot_violations{0}, idle_waits{0}, cma_jobs{0}, aborts_deferred{0};
    std::atomic<uint64_t> doorbell_sent{0}, doorbell_received{0}, doorbell_wakes{0};
    std::atomic<uint64_t> landings{0}, landing_rejected{0}, landing_waits{0}, gpu_layer_launches{0};
    std::atomic<uint64_t> ipc_pools_mapped{0}, sends_waited_for_slot{0}, peers_released{0}, peers_fenced{0};
    std::atomic<uint64_t> heartbeats_sent{0}, peers_silent{0}, imm_writes{0};
  } counters_;
  // One immediate counts every write before it on a rail (transport orders writes, KVXFER_IMM not "each").
  bool coalesce_imms_ = false;
  mutable std::atomic<uint32_t> corrupt_landing_batches_{0};  // tests (corrupt_next_landing_batches)

  std::atomic<bool> stop_{false};
  std::thread progress_;
};

}  // namespace kvxfer
