// UcxTransport, built as the plugin kvxfer/_ucx.so (ucx_plugin.h): one UCP worker, one endpoint per peer.
//
// UCX has no write-with-immediate, so the immediate travels behind the data: writes are ucp_put_nbx, their
// immediates wait in a per-peer queue until an endpoint flush covering those puts completes (the bytes are then in
// the peer's memory), and go out as one active message carrying every immediate the flush released. Control
// messages wait in the same queue, so a peer sees messages and immediates in the order they were posted, as on a
// libfabric endpoint. The flush is issued once per poll for all the puts posted since the last one, so its cost is
// shared by a batch, not paid per write.
//
// Where UCX has no RMA lane to a peer (its tcp transport: "ucx lanes: tcp/lo (am, keepalive)"), UCP emulates a put
// with active messages and answers each with an acknowledgement; UCX 1.13 aborts the *target* process when that
// acknowledgement meets an endpoint that failed meanwhile ("ucp_request.inl:346 Fatal: unexpected error: Endpoint
// timeout": a sender killed mid-transfer took its receiver down, kvxfer.bench.soak, 3 of 3 runs). To such peers a
// write is one active message of ours instead (data AM: its pieces, where each goes, and the immediate): the
// receiver checks every piece against the memory it exported under the named key, copies it there and counts the
// immediate, so nothing is acknowledged and the immediate can never arrive before its bytes. KVXFER_UCX_WRITES=put
// keeps UCX's puts (the only choice with a native RMA lane, e.g. InfiniBand); =am forces the messages.
//
// UCX remote keys are opaque blobs of tens of bytes, not 64-bit keys: register_memory hands the agent its requested
// key as the "rkey", exported_keys() maps every such key to its packed UCX rkey for the metadata, and the peer's
// import_keys() / first write unpacks them.
#include "transports/ucx/ucx_plugin.h"

#include <cstdint>
#include <string>
#include <vector>

#include <ucp/api/ucp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <unordered_map>
#include <vector>

#include "core/errors.h"
#include "core/peer_key.h"
#include "transports/transport.h"
#include "transports/ucx/data_am.h"

namespace kvxfer {
namespace {

constexpr unsigned kImmAm = 0x4b56;  // an active message carrying immediates (u32 each)
constexpr unsigned kMsgAm = 0x4b57;  // an active message carrying one control message
constexpr unsigned kDataAm = 0x4b58;  // a write (data_am.h): where its pieces go in the header, their bytes as data
using ucx_data::DataHeader;
using ucx_data::DataPiece;
using ucx_data::kMaxPieces;
constexpr size_t kMaxImmsPerAm = 256;
constexpr int kProgressPerPoll = 64;
constexpr uint32_t kMaxKeys = 4096;
constexpr uint32_t kMaxPackedKey = 16384;
constexpr uint8_t kAddressTag = 'U';
constexpr const char* kTcpSegSize = "64k";  // first byte of our address: a libfabric peer's address is refused by name

std::string status_text(ucs_status_t s) { return std::string(ucs_status_string(s)) + " (" + std::to_string(s) + ")"; }

// UCX transports that never give an endpoint a hardware RMA lane to another host: where a context has nothing else,
// "auto" writes by data AMs to every peer anyway, and so can fence peers (kvxfer checks every AM's key itself).
bool without_rma_lanes(const std::string& tl) {
  for (const char* name : {"self", "tcp", "sysv", "posix", "cma", "knem", "xpmem", "ud_verbs", "ud_mlx5"})
    if (tl == name) return true;
  return false;
}

#define KVXFER_UCS_CALL(kind, call, what)                                                    \
  do {                                                                                       \
    const ucs_status_t kvxfer_st_ = (call);                                                  \
    KVXFER_CHECK(kvxfer_st_ == UCS_OK, kind, what << " failed: " << status_text(kvxfer_st_)); \
  } while (0)

// An immediate or a control message waiting for the flush that makes the puts before it visible at the peer.
struct Outgoing {
  uint64_t after_put = 0;  // the peer's put count when this was posted: sendable once flushed >= after_put
  bool is_message = false;
  uint32_t imm = 0;
  void* context = nullptr;  // the write's completion context (WriteDone once the immediate leaves)
  uint16_t msg_len = 0;
  std::array<uint8_t, Transport::kMaxMessageBytes> msg{};
};

class UcxTransport;

struct UcxPeer {
  UcxTransport* owner = nullptr;
  ucp_ep_h ep = nullptr;
  bool am_writes = false;  // writes go as data AMs (no RMA lane to this peer, or KVXFER_UCX_WRITES=am)
  std::atomic<bool> sent{false};  // UCX completed a send of ours on the endpoint: its lanes are wired
  bool failed = false;
  std::string error;
  std::unordered_map<uint64_t, std::vector<uint8_t>> packed;  // the peer's rkeys as it published them
  std::unordered_map<uint64_t, ucp_rkey_h> rkeys;             // unpacked on first use (progress thread)
  std::set<uint64_t> own_keys;  // ours for its published keys, where it gives each writer its own (data AMs only)
  uint64_t write_salt = 0;      // what own_keys derive from (set_write_salt: the peer's HELLO named it)
  // Data AMs UCX has not completed, by the agent's context; once the peer is removed they are reported failed at
  // once and their late completions ignored (abandoned), and the endpoint closes when none is left (remove_peer).
  std::set<void*> in_flight, abandoned;
  bool close_when_idle = false;
  uint64_t puts = 0;             // puts posted so far
  uint64_t flush_requested = 0;  // puts covered by the last flush asked for
  uint64_t flushed = 0;          // puts known to be in the peer's memory
  std::deque<Outgoing> queue;
};

struct FlushRequest {
  UcxTransport* transport;
  UcxPeer* peer;
  uint64_t puts;
};

// A data AM in flight: the header and iov UCX reads until it calls back.
struct DataSend {
  UcxTransport* transport;
  UcxPeer* peer;
  void* context;
  std::vector<uint8_t> header;
  std::array<ucp_dt_iov_t, kMaxPieces> iov;
};

struct PendingEvent {
  Event event;
  std::vector<uint8_t> msg;  // a Message's bytes, owned here until handed out
};

class UcxTransport final : public Transport {
 public:
  explicit UcxTransport(const std::string& interface) {
    ucp_config_t* config = nullptr;
    KVXFER_UCS_CALL(TransportUnavailable, ucp_config_read(nullptr, nullptr, &config), "ucp_config_read");
    if (!interface.empty()) {
      const ucs_status_t st = ucp_config_modify(config, "NET_DEVICES", interface.c_str());
      if (st != UCS_OK) ucp_config_release(config);
      KVXFER_CHECK(st == UCS_OK, TransportUnavailable,
                   "UCX refused NET_DEVICES=" << interface << ": " << status_text(st));
    }
    // UCX's tcp moves a put in segments of UCX_TCP_TX_SEG_SIZE (8 KiB by default); KV chunks are tens of KiB, and
    // on loopback 64 KiB segments doubled a 512 MiB request's bandwidth (benchmarks/RESULTS.md). Set here by the
    // unprefixed field name (the form ucp_config_modify applies to transports); the user's UCX_TCP_* wins.
    for (const char* name : {"TX_SEG_SIZE", "RX_SEG_SIZE"})
      if (!std::getenv((std::string("UCX_TCP_") + name).c_str())) ucp_config_modify(config, name, kTcpSegSize);
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME;
    params.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
    params.name = "kvxfer";
    const ucs_status_t st = ucp_init(&params, config, &context_);
    ucp_config_release(config);
    KVXFER_CHECK(st == UCS_OK, TransportUnavailable,
                 "ucp_init failed: " << status_text(st) << "; check UCX_TLS / UCX_NET_DEVICES (`ucx_info -d` lists "
                                                           "what UCX sees here)");
    ucp_context_attr_t attr{};
    attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
    ucp_context_query(context_, &attr);

    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    // The agent serializes every call into a transport (its transport_mu_), so the worker needs no locks of its own.
    wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;
    KVXFER_UCS_CALL(TransportUnavailable, ucp_worker_create(context_, &wp, &worker_), "ucp_worker_create");
    set_am_handler(kImmAm, &UcxTransport::on_imm_am);
    set_am_handler(kMsgAm, &UcxTransport::on_msg_am);
    set_am_handler(kDataAm, &UcxTransport::on_data_am);
    if (const char* w = std::getenv("KVXFER_UCX_WRITES"); w && *w) {
      const std::string v = w;
      KVXFER_CHECK(v == "auto" || v == "am" || v == "put", InvalidArgument,
                   "KVXFER_UCX_WRITES='" << v << "': use auto (active messages where UCX has no RMA lane), am or put");
      writes_mode_ = v;
    }
    if (!idle_wait_fd_wanted() || ucp_worker_get_efd(worker_, &efd_) != UCS_OK) efd_ = -1;

    char version[32];
    kvxfer_ucx_version(version, sizeof(version));
    caps_.provider = std::string("ucx ") + version;
    caps_.name = "ucx";
    caps_.remote_virt_addr = true;  // ucp_put_nbx addresses the peer's virtual addresses
    caps_.max_write_bytes = 8ull << 20;
    caps_.max_inflight = 1024;
    caps_.max_iov = 16;  // a gathered write is n puts and one immediate
    caps_.num_rails = 1;  // UCX spreads over its own lanes and rails (UCX_MAX_RMA_RAILS)
    // Closing an endpoint that still owes its peer a wireup reply aborts UCX 1.13 (see shutdown()): a lost peer's
    // endpoint is closed only once the handshake is over both ways (the agent saw the peer's HELLOs, and UCX
    // completed a send of ours on it); otherwise it stays until the process exits.
    caps_.releases_peers = true;
    caps_.releases_connected_peers_only = true;
    caps_.hmem = (attr.memory_types & UCS_BIT(UCS_MEMORY_TYPE_CUDA)) != 0;
    // Per-peer keys where every write is a data AM (each piece names a key this agent checks): not with puts, whose
    // UCX rkeys stay valid for every peer, nor with GPU pools (those take puts).
    bool all_am = writes_mode_ == "am";
    if (writes_mode_ == "auto") {
      all_am = true;
      for (const auto& tl : resource_names()) all_am = all_am && without_rma_lanes(tl.substr(0, tl.find('/')));
    }
    caps_.fences_peers = all_am && !caps_.hmem && own_peer_keys_wanted();
  }

  // The worker, its endpoints and the context are left to the process's exit on purpose (see shutdown()): UCX 1.13
  // aborts when an endpoint that still owes a peer a wireup reply is closed or purged with its worker. Registrations
  // are released; what stays is the worker's memory pools and a few descriptors.
  ~UcxTransport() override {
    shutdown();
    for (unsigned id : {kImmAm, kMsgAm, kDataAm}) {  // nothing of the leaked worker may call back into this object
      ucp_am_handler_param_t hp{};
      hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB;
      hp.id = id;
      hp.cb = nullptr;
      ucp_worker_set_am_recv_handler(worker_, &hp);
    }
    for (auto& [id, reg] : exported_) ucp_mem_unmap(context_, reg.memh);
  }

  // Stops using every endpoint but closes none: UCX 1.13 aborts the process ("got REP message") when an endpoint
  // is closed, or its worker destroyed, while it still owes a peer a wireup reply (ucp_ep_close_nbx ->
  // uct_tcp_ep_pending_purge in a suite run, ucp_worker_destroy in another). Endpoints and worker are left to the
  // process's exit; peers learn we are gone from it (error mode peer) or from the agent's own protocol.
  void shutdown() override {
    flush_messages(std::chrono::milliseconds(200));
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& p : peers_) {
      for (auto& [id, rkey] : p->rkeys) ucp_rkey_destroy(rkey);
      p->rkeys.clear();
      p->failed = true;
      p->queue.clear();
    }
    queued_ = 0;
  }

  const Capabilities& capabilities() const override { return caps_; }

  std::vector<uint8_t> address() const override {
    ucp_address_t* addr = nullptr;
    size_t len = 0;
    KVXFER_UCS_CALL(TransportUnavailable, ucp_worker_get_address(worker_, &addr, &len), "ucp_worker_get_address");
    std::vector<uint8_t> out(1 + len);
    out[0] = kAddressTag;
    std::memcpy(out.data() + 1, addr, len);
    ucp_worker_release_address(worker_, addr);
    return out;
  }

  MemoryKey register_memory(void* addr, size_t nbytes, uint64_t requested_key, int device) override {
    KVXFER_CHECK(device < 0 || caps_.hmem, TransportUnavailable,
                 "this UCX (" << caps_.provider << ") was built without CUDA, so it cannot register GPU memory; the "
                              "agent stages GPU pools through pinned host buffers instead");
    ucp_mem_map_params_t mp{};
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    mp.address = addr;
    mp.length = nbytes;
    if (device >= 0) {
      mp.field_mask |= UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
      mp.memory_type = UCS_MEMORY_TYPE_CUDA;
    }
    ucp_mem_h memh = nullptr;
    ucs_status_t st = ucp_mem_map(context_, &mp, &memh);
    KVXFER_CHECK(st == UCS_OK, RegistrationFailed,
                 "ucp_mem_map of " << nbytes << " bytes at " << addr << " failed: " << status_text(st)
                                   << "; check that the memory is allocated");
    void* packed = nullptr;
    size_t packed_len = 0;
    st = ucp_rkey_pack(context_, memh, &packed, &packed_len);
    if (st != UCS_OK || packed_len > kMaxPackedKey) {
      if (st == UCS_OK) ucp_rkey_buffer_release(packed);
      ucp_mem_unmap(context_, memh);
      KVXFER_THROW(RegistrationFailed, "ucp_rkey_pack failed: " << (st == UCS_OK ? "key of " + std::to_string(packed_len) + " bytes" : status_text(st)));
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      KVXFER_ASSERT(exported_.count(requested_key) == 0 && requested_key != 0);
      exported_[requested_key] = {memh, std::vector<uint8_t>(static_cast<uint8_t*>(packed),
                                                             static_cast<uint8_t*>(packed) + packed_len)};
    }
    ucp_rkey_buffer_release(packed);
    // Data AMs land in host memory only (a GPU pool takes puts, with a CUDA-enabled UCX); with per-peer keys only
    // under the peers' own keys (register_peer_key).
    if (device < 0 && !caps_.fences_peers) {
      std::lock_guard<std::mutex> lock(regions_mu_);
      regions_[requested_key] = {reinterpret_cast<uint64_t>(addr), nbytes};
    }
    return MemoryKey{memh, nullptr, requested_key};
  }

  // A peer's key (Agent::open_peer_keys): its data AMs may land in [addr, addr + nbytes) under it until it is
  // deregistered; regions_mu_ makes that exact (an AM being copied finishes first, none lands after).
  MemoryKey register_peer_key(void* addr, size_t nbytes, uint64_t key) override {
    KVXFER_ASSERT(caps_.fences_peers);
    std::lock_guard<std::mutex> lock(regions_mu_);
    KVXFER_CHECK(regions_.count(key) == 0 && key != 0, RegistrationFailed,
                 "a peer's key " << std::hex << key << std::dec << " is taken (two peers' keys collided): restart that "
                                    "peer's agent, whose new epoch derives new keys");
    regions_[key] = {reinterpret_cast<uint64_t>(addr), nbytes};
    return MemoryKey{&regions_, nullptr, key};
  }

  void deregister_memory(MemoryKey& key) override {
    if (key.handle == &regions_) {  // a peer's key
      std::lock_guard<std::mutex> lock(regions_mu_);
      regions_.erase(key.rkey);
    } else if (key.handle) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        exported_.erase(key.rkey);
      }
      {
        std::lock_guard<std::mutex> lock(regions_mu_);
        regions_.erase(key.rkey);
      }
      ucp_mem_unmap(context_, static_cast<ucp_mem_h>(key.handle));
    }
    key = MemoryKey{};
  }

  void set_write_salt(PeerAddr peer, uint64_t salt) override {
    std::lock_guard<std::mutex> lock(mu_);
    UcxPeer& p = peer_at(peer);
    p.write_salt = salt;
    p.own_keys.clear();
    for (const auto& [id, bytes] : p.packed) p.own_keys.insert(peer_key(id, salt));
  }

  // u32 count | count x (u64 key | u32 length | packed rkey)
  std::vector<uint8_t> exported_keys() const override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<uint8_t> out;
    put_u32(out, static_cast<uint32_t>(exported_.size()));
    for (const auto& [id, reg] : exported_) {
      for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(id >> (8 * i)));
      put_u32(out, static_cast<uint32_t>(reg.packed.size()));
      out.insert(out.end(), reg.packed.begin(), reg.packed.end());
    }
    return out;
  }

  void import_keys(PeerAddr peer, const std::vector<uint8_t>& keys) override {
    auto parsed = parse_keys(keys);
    std::lock_guard<std::mutex> lock(mu_);
    UcxPeer& p = peer_at(peer);
    for (auto& [id, bytes] : parsed) {
      if (p.write_salt) p.own_keys.insert(peer_key(id, p.write_salt));
      auto it = p.rkeys.find(id);
      if (it != p.rkeys.end() && p.packed[id] != bytes) {  // the peer re-registered under that key
        ucp_rkey_destroy(it->second);
        p.rkeys.erase(it);
      }
      p.packed[id] = std::move(bytes);
    }
  }

  PeerAddr insert_peer(const std::vector<uint8_t>& address) override {
    KVXFER_CHECK(address.size() > 1 && address[0] == kAddressTag, TransportUnavailable,
                 "the peer's address is not a UCX worker address: it uses another transport; create both agents "
                 "with transport='ucx'");
    auto peer = std::make_unique<UcxPeer>();
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.address = reinterpret_cast<const ucp_address_t*>(address.data() + 1);
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;  // a dead peer fails its operations instead of hanging them
    ep.err_handler.cb = &UcxTransport::on_ep_error;
    ep.err_handler.arg = peer.get();
    peer->owner = this;
    ucs_status_t st = ucp_ep_create(worker_, &ep, &peer->ep);
    KVXFER_CHECK(st == UCS_OK, PeerUnknown,
                 "ucp_ep_create towards the peer failed: " << status_text(st)
                                                           << "; the peer may be unreachable with this UCX_TLS");
    // UCX chose the endpoint's lanes from the peer's address: without an RMA lane its puts are emulated (above).
    peer->am_writes = caps_.fences_peers || writes_mode_ == "am" || (writes_mode_ == "auto" && !has_rma_lane(peer->ep));
    std::lock_guard<std::mutex> lock(mu_);
    peers_.push_back(std::move(peer));
    return peers_.size() - 1;
  }

  // The agent releases a lost peer once nothing of ours is in flight to it and it had connected: the endpoint is
  // closed (its socket and buffers go) when UCX also completed a send on it; otherwise it is only marked failed.
  //
  // Not while UCX still holds writes of ours to it (a peer cut off, our data AMs stuck in the socket): closing the
  // endpoint then crashed UCX 1.13 inside uct_tcp_iface_progress once the link came back (tests/test_partition.py,
  // 2 of 3 runs). Those writes are reported failed now, so the agent's sends settle, and the endpoint closes once
  // UCX has completed them (the link back, or UCX giving up on it).
  void remove_peer(PeerAddr peer) override {
    std::lock_guard<std::mutex> lock(mu_);
    UcxPeer& p = peer_at(peer);
    fail_peer(p, "the peer was removed");
    if (!p.in_flight.empty()) {
      for (void* context : p.in_flight) report_failed(p, context);
      queued_ -= p.in_flight.size();
      p.abandoned.insert(p.in_flight.begin(), p.in_flight.end());
      p.in_flight.clear();
      p.close_when_idle = true;
      return;
    }
    close_endpoint(p);
  }

  void close_endpoint(UcxPeer& p) {  // mu_ held
    p.close_when_idle = false;
    if (!p.ep || !p.sent.load()) return;
    for (auto& [id, rkey] : p.rkeys) ucp_rkey_destroy(rkey);  // before their endpoint goes
    p.rkeys.clear();
    ucp_request_param_t rp{};
    rp.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    rp.flags = UCP_EP_CLOSE_FLAG_FORCE;  // the peer may be gone: do not wait for it to agree
    ucs_status_ptr_t req = ucp_ep_close_nbx(p.ep, &rp);
    p.ep = nullptr;
    if (req && !UCS_PTR_IS_ERR(req)) closing_.push_back(req);
  }

  uint32_t peer_rails(PeerAddr peer) const override { return 1; }

  std::string describe_peer(PeerAddr peer) const override {
    ucp_ep_h ep;
    bool am;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (peer >= peers_.size() || !peers_[peer]->ep) return {};
      ep = peers_[peer]->ep;
      am = peers_[peer]->am_writes;
    }
    const std::string lanes = describe_lanes(ep);
    return lanes.empty() ? lanes
                         : lanes + (!am                 ? "; writes: ucp puts"
                                    : caps_.fences_peers ? "; writes: kvxfer active messages under keys of our own"
                                                         : "; writes: kvxfer active messages (UCX emulates puts "
                                                           "without an RMA lane)");
  }

  int post_write(const void* src, size_t nbytes, void* desc, uint32_t imm, PeerAddr peer, uint64_t remote_addr,
                 uint64_t rkey, void* context, uint32_t rail) override {
    WriteIov w{src, nbytes, desc, remote_addr, rkey};
    return post_writev(&w, nbytes ? 1 : 0, imm, peer, context, rail);
  }

  int post_writev(const WriteIov* w, size_t n, uint32_t imm, PeerAddr peer, void* context, uint32_t rail) override {
    std::lock_guard<std::mutex> lock(mu_);
    UcxPeer& p = peer_at(peer);
    if (p.failed) return report_failed(p, context);
    if (queued_ >= caps_.max_inflight) return -EAGAIN;
    if (p.am_writes) return post_data_am(p, w, n, imm, context);
    ucp_rkey_h rkeys[16];
    KVXFER_ASSERT(n <= 16);
    for (size_t i = 0; i < n; ++i) rkeys[i] = w[i].nbytes ? rkey_for(p, w[i].rkey) : nullptr;  // may throw: first
    for (size_t i = 0; i < n; ++i) {
      if (w[i].nbytes == 0) continue;
      ucp_request_param_t rp{};  // no callback: the flush behind the put reports its completion
      ucs_status_ptr_t req = ucp_put_nbx(p.ep, w[i].src, w[i].nbytes, w[i].remote_addr, rkeys[i], &rp);
      if (UCS_PTR_IS_ERR(req)) {
        fail_peer(p, "ucp_put_nbx(" + std::to_string(w[i].nbytes) + " bytes) failed: " +
                         status_text(UCS_PTR_STATUS(req)));
        return report_failed(p, context);
      }
      if (req) ucp_request_free(req);  // released by UCX once done
      ++p.puts;
    }
    Outgoing o;
    o.after_put = p.puts;
    o.imm = imm;
    o.context = context;
    p.queue.push_back(o);
    ++queued_;
    writes_.fetch_add(1, std::memory_order_relaxed);
    return 0;
  }

  int post_message(const void* msg, size_t nbytes, PeerAddr peer, void* context, uint32_t rail) override {
    KVXFER_ASSERT(nbytes <= kMaxMessageBytes);
    std::lock_guard<std::mutex> lock(mu_);
    UcxPeer& p = peer_at(peer);
    if (p.failed) return 0;  // as a libfabric send to a gone peer: it never arrives
    Outgoing o;
    o.after_put = p.puts;
    o.is_message = true;
    o.context = context;
    o.msg_len = static_cast<uint16_t>(nbytes);
    std::memcpy(o.msg.data(), msg, nbytes);
    p.queue.push_back(o);
    return 0;
  }

  size_t poll(Event* events, size_t max) override {
    delivered_.clear();
    // Bounded: a worker that keeps finding work (a connection handshake, a stream of messages) must not keep the
    // agent's loop (commands, deadlines, the transport lock) waiting.
    for (int i = 0; i < kProgressPerPoll && ucp_worker_progress(worker_) != 0; ++i) {
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      apply_outcomes();
      for (auto& p : peers_) {
        request_flush(*p);
        drain(*p);
      }
      reap_closed();
    }
    size_t out = 0;
    while (out < max && !pending_.empty()) {
      PendingEvent& pe = pending_.front();
      events[out] = pe.event;
      if (pe.event.kind == Event::Kind::Message) {
        delivered_.push_back(std::move(pe.msg));
        events[out].msg = delivered_.back().data();
      }
      ++out;
      pending_.pop_front();
    }
    return out;
  }

  std::vector<int> wait_fds() const override { return efd_ >= 0 ? std::vector<int>{efd_} : std::vector<int>{}; }

  bool ready_to_wait() override {
    if (!pending_.empty()) return false;
    {
      std::lock_guard<std::mutex> lock(done_mu_);
      if (!outcomes_.empty()) return false;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const auto& p : peers_) {
        if (p->puts > p->flush_requested) return false;
        if (!p->queue.empty() && (p->failed || p->queue.front().after_put <= p->flushed)) return false;
      }
    }
    return ucp_worker_arm(worker_) == UCS_OK;  // UCS_ERR_BUSY: events are waiting, progress first
  }

  std::vector<RailStats> rail_stats() const override { return {{writes_.load(), imms_.load()}}; }

 private:
  struct Exported {
    ucp_mem_h memh;
    std::vector<uint8_t> packed;
  };

  static void put_u32(std::vector<uint8_t>& out, uint32_t v) {
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
  }

  static std::vector<std::pair<uint64_t, std::vector<uint8_t>>> parse_keys(const std::vector<uint8_t>& b) {
    size_t at = 0;
    auto need = [&](size_t n, const char* what) {
      KVXFER_CHECK(at + n <= b.size(), MetadataError,
                   "peer's UCX keys truncated in " << what << " at byte " << at << " of " << b.size());
    };
    auto u32 = [&](const char* what) {
      need(4, what);
      uint32_t v = 0;
      for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(b[at + i]) << (8 * i);
      at += 4;
      return v;
    };
    KVXFER_CHECK(!b.empty(), MetadataError,
                 "the peer sent no UCX keys: it does not use transport 'ucx'; create both agents with "
                 "transport='ucx'");
    const uint32_t count = u32("the key count");
    KVXFER_CHECK(count <= kMaxKeys, MetadataError, "peer's UCX keys claim " << count << " keys (at most " << kMaxKeys << ")");
    std::vector<std::pair<uint64_t, std::vector<uint8_t>>> out;
    for (uint32_t k = 0; k < count; ++k) {
      need(8, "a key id");
      uint64_t id = 0;
      for (int i = 0; i < 8; ++i) id |= static_cast<uint64_t>(b[at + i]) << (8 * i);
      at += 8;
      const uint32_t len = u32("a key length");
      KVXFER_CHECK(len > 0 && len <= kMaxPackedKey, MetadataError,
                   "peer's UCX key " << k << " claims " << len << " bytes (1 to " << kMaxPackedKey << ")");
      need(len, "a packed key");
      out.emplace_back(id, std::vector<uint8_t>(b.begin() + at, b.begin() + at + len));
      at += len;
    }
    KVXFER_CHECK(at == b.size(), MetadataError, "peer's UCX keys have " << b.size() - at << " trailing bytes");
    return out;
  }

  UcxPeer& peer_at(PeerAddr peer) const {
    KVXFER_CHECK(peer < peers_.size(), PeerUnknown, "no UCX endpoint " << peer << " (the peer was never added)");
    return *peers_[peer];
  }

  ucp_rkey_h rkey_for(UcxPeer& p, uint64_t id) {
    auto it = p.rkeys.find(id);
    if (it != p.rkeys.end()) return it->second;
    auto packed = p.packed.find(id);
    KVXFER_CHECK(packed != p.packed.end(), AccessViolation,
                 "the peer exposed no memory under key " << id << "; re-add it with its current metadata");
    ucp_rkey_h rkey = nullptr;
    KVXFER_UCS_CALL(MetadataError, ucp_ep_rkey_unpack(p.ep, packed->second.data(), &rkey),
                    "ucp_ep_rkey_unpack of the peer's key " << id);
    p.rkeys[id] = rkey;
    return rkey;
  }

  // A write to a peer without an RMA lane (mu_ held): one data AM, sent eagerly so the receiver's handler has the
  // bytes at once (never a rendezvous, which would fetch them with the same emulated RMA).
  int post_data_am(UcxPeer& p, const WriteIov* w, size_t n, uint32_t imm, void* context) {
    KVXFER_ASSERT(n <= kMaxPieces);
    auto ds = std::make_unique<DataSend>(DataSend{this, &p, context, {}, {}});
    DataHeader h;
    h.imm = imm;
    h.has_imm = 1;
    ds->header.resize(sizeof(h) + n * sizeof(DataPiece));
    for (size_t i = 0; i < n; ++i) {
      if (w[i].nbytes == 0) continue;
      KVXFER_CHECK(caps_.fences_peers ? p.own_keys.count(w[i].rkey) : p.packed.count(w[i].rkey), AccessViolation,
                   "the peer exposed no memory under key "
                       << w[i].rkey << (caps_.fences_peers ? " (our own for one it published)" : "")
                       << "; re-add it with its current metadata");
      const DataPiece piece{w[i].rkey, w[i].remote_addr, w[i].nbytes};
      std::memcpy(ds->header.data() + sizeof(h) + h.pieces * sizeof(DataPiece), &piece, sizeof(piece));
      ds->iov[h.pieces++] = {const_cast<void*>(w[i].src), w[i].nbytes};
    }
    ds->header.resize(sizeof(h) + h.pieces * sizeof(DataPiece));
    std::memcpy(ds->header.data(), &h, sizeof(h));
    ucp_request_param_t rp{};
    rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS |
                      UCP_OP_ATTR_FIELD_DATATYPE;
    rp.cb.send = &UcxTransport::on_data_sent;
    rp.user_data = ds.get();
    rp.flags = UCP_AM_SEND_FLAG_EAGER;
    rp.datatype = h.pieces ? ucp_dt_make_iov() : ucp_dt_make_contig(1);
    ucs_status_ptr_t req = ucp_am_send_nbx(p.ep, kDataAm, ds->header.data(), ds->header.size(),
                                           h.pieces ? ds->iov.data() : nullptr, h.pieces, &rp);
    writes_.fetch_add(1, std::memory_order_relaxed);
    if (UCS_PTR_IS_ERR(req)) {
      fail_peer(p, "ucp_am_send_nbx of a write failed: " + status_text(UCS_PTR_STATUS(req)));
      return report_failed(p, context);
    }
    if (req == nullptr) {  // sent already: UCX copied what it needed
      write_done(context);
      return 0;
    }
    ds.release();  // on_data_sent frees it
    ++queued_;
    p.in_flight.insert(context);
    return 0;
  }

  // Endpoint closes that completed hand their requests back (mu_ held).
  void reap_closed() {
    size_t keep = 0;
    for (void* req : closing_) {
      if (ucp_request_check_status(req) == UCS_INPROGRESS) closing_[keep++] = req;
      else ucp_request_free(req);
    }
    closing_.resize(keep);
  }

  void write_done(void* context) {
    if (!context) return;
    PendingEvent pe;
    pe.event.kind = Event::Kind::WriteDone;
    pe.event.context = context;
    pending_.push_back(std::move(pe));
  }

  int report_failed(UcxPeer& p, void* context) {
    if (context) {
      PendingEvent pe;
      pe.event.kind = Event::Kind::OpError;
      pe.event.context = context;
      pe.event.error = "UCX endpoint failed: " + p.error;
      pending_.push_back(std::move(pe));
    }
    return 0;
  }

  // Every queued write of a failed peer completes with its error; queued messages are dropped.
  void fail_peer(UcxPeer& p, const std::string& why) {
    if (!p.failed) {
      p.failed = true;
      p.error = why;
    }
    for (auto& o : p.queue) {
      if (!o.is_message) --queued_;
      if (!o.is_message) report_failed(p, o.context);
    }
    p.queue.clear();
  }

  void request_flush(UcxPeer& p) {
    if (p.failed || p.puts == p.flush_requested) return;
    auto* fr = new FlushRequest{this, &p, p.puts};
    ucp_request_param_t rp{};
    rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    rp.cb.send = &UcxTransport::on_flushed;
    rp.user_data = fr;
    p.flush_requested = p.puts;
    ucs_status_ptr_t req = ucp_ep_flush_nbx(p.ep, &rp);
    if (req == nullptr) {
      p.flushed = std::max(p.flushed, fr->puts);
      delete fr;
    } else if (UCS_PTR_IS_ERR(req)) {
      delete fr;
      fail_peer(p, "ucp_ep_flush_nbx failed: " + status_text(UCS_PTR_STATUS(req)));
    }
  }

  // Sends what the flushes released, in order: runs of immediates as one active message each, messages alone.
  void drain(UcxPeer& p) {
    while (!p.failed && !p.queue.empty() && p.queue.front().after_put <= p.flushed) {
      if (p.queue.front().is_message) {
        const Outgoing& o = p.queue.front();
        send_am(p, kMsgAm, o.msg.data(), o.msg_len);
        p.queue.pop_front();
        continue;
      }
      std::vector<uint8_t> imms;
      while (!p.queue.empty() && !p.queue.front().is_message && p.queue.front().after_put <= p.flushed &&
             imms.size() < 4 * kMaxImmsPerAm) {
        const Outgoing& o = p.queue.front();
        put_u32(imms, o.imm);
        if (o.context) {
          PendingEvent pe;
          pe.event.kind = Event::Kind::WriteDone;
          pe.event.context = o.context;
          pending_.push_back(std::move(pe));
        }
        --queued_;
        p.queue.pop_front();
      }
      send_am(p, kImmAm, imms.data(), imms.size());
    }
  }

  // Nobody progresses the worker once the agent stopped, so messages still queued here or in UCX (a closing
  // agent's BYEs) would never leave: progress until they did, at most `limit`. Single-threaded (agent teardown).
  void flush_messages(std::chrono::milliseconds limit) {
    const auto until = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < until) {
      ucp_worker_progress(worker_);
      std::lock_guard<std::mutex> lock(mu_);
      apply_outcomes();
      bool waiting = ams_in_flight_ > 0;
      for (auto& p : peers_) {
        request_flush(*p);
        drain(*p);
        waiting = waiting || (!p->failed && !p->queue.empty());
      }
      if (!waiting) return;
    }
  }

  struct AmSend {
    UcxTransport* transport;
    UcxPeer* peer;
    std::vector<uint8_t> bytes;
  };

  void send_am(UcxPeer& p, unsigned id, const void* data, size_t len) {
    auto* am = new AmSend{this, &p, {static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + len}};
    ucp_request_param_t rp{};
    rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
    rp.cb.send = &UcxTransport::on_am_sent;
    rp.user_data = am;
    rp.flags = UCP_AM_SEND_FLAG_EAGER;  // small: the receiver's handler gets the bytes at once
    ucs_status_ptr_t req = ucp_am_send_nbx(p.ep, id, nullptr, 0, am->bytes.data(), am->bytes.size(), &rp);
    if (req == nullptr) {
      delete am;
      p.sent = true;
    } else if (UCS_PTR_IS_ERR(req)) {
      delete am;
      fail_peer(p, "ucp_am_send_nbx failed: " + status_text(UCS_PTR_STATUS(req)));
    } else {
      ++ams_in_flight_;
    }
  }

  void set_am_handler(unsigned id, ucp_am_recv_callback_t cb) {
    ucp_am_handler_param_t hp{};
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG |
                    UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
    hp.id = id;
    hp.cb = cb;
    hp.arg = this;
    hp.flags = UCP_AM_FLAG_WHOLE_MSG;
    KVXFER_UCS_CALL(TransportUnavailable, ucp_worker_set_am_recv_handler(worker_, &hp), "ucp_worker_set_am_recv_handler");
  }

  // Runs inside ucp_worker_progress (our poll), so pending_ needs no lock.
  static ucs_status_t on_imm_am(void* arg, const void* header, size_t header_len, void* data, size_t len,
                                const ucp_am_recv_param_t* param) {
    auto* self = static_cast<UcxTransport*>(arg);
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) || len % 4 != 0) return UCS_OK;  // not ours: ignore
    const auto* b = static_cast<const uint8_t*>(data);
    for (size_t at = 0; at < len; at += 4) {
      PendingEvent pe;
      pe.event.kind = Event::Kind::RemoteData;
      pe.event.imm = static_cast<uint32_t>(b[at]) | static_cast<uint32_t>(b[at + 1]) << 8 |
                     static_cast<uint32_t>(b[at + 2]) << 16 | static_cast<uint32_t>(b[at + 3]) << 24;
      self->pending_.push_back(std::move(pe));
    }
    self->imms_.fetch_add(len / 4, std::memory_order_relaxed);
    return UCS_OK;
  }

  static ucs_status_t on_msg_am(void* arg, const void* header, size_t header_len, void* data, size_t len,
                                const ucp_am_recv_param_t* param) {
    auto* self = static_cast<UcxTransport*>(arg);
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) || len == 0 || len > kMaxMessageBytes) return UCS_OK;
    PendingEvent pe;
    pe.event.kind = Event::Kind::Message;
    pe.event.msg_len = len;
    pe.msg.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + len);
    self->pending_.push_back(std::move(pe));
    return UCS_OK;
  }

  // A peer's write (data AM): copied into our memory only when data_am.h's checks pass, then its immediate counts.
  // A message that fails them is dropped (its transfer then misses its deadline, naming the layers).
  static ucs_status_t on_data_am(void* arg, const void* header, size_t header_len, void* data, size_t len,
                                 const ucp_am_recv_param_t* param) {
    auto* self = static_cast<UcxTransport*>(arg);
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) return UCS_OK;  // our senders never ask for a rendezvous
    DataHeader h;
    DataPiece pieces[kMaxPieces];
    {
      // Held while copying: a region deregistered meanwhile (its memory may be freed next) is never written.
      std::lock_guard<std::mutex> lock(self->regions_mu_);
      const std::string why = ucx_data::check(
          static_cast<const uint8_t*>(header), header_len, len,
          [self](uint64_t key) -> const ucx_data::Region* {
            auto it = self->regions_.find(key);
            return it == self->regions_.end() ? nullptr : &it->second;
          },
          &h, pieces);
      if (!why.empty()) return UCS_OK;
      const auto* from = static_cast<const uint8_t*>(data);
      for (uint32_t i = 0; i < h.pieces; ++i) {
        std::memcpy(reinterpret_cast<void*>(pieces[i].remote_addr), from, pieces[i].nbytes);
        from += pieces[i].nbytes;
      }
    }
    if (h.has_imm) {
      PendingEvent pe;
      pe.event.kind = Event::Kind::RemoteData;
      pe.event.imm = h.imm;
      self->pending_.push_back(std::move(pe));
      self->imms_.fetch_add(1, std::memory_order_relaxed);
    }
    return UCS_OK;
  }

  static void on_data_sent(void* request, ucs_status_t status, void* user_data) {
    auto* ds = static_cast<DataSend*>(user_data);
    {
      std::lock_guard<std::mutex> lock(ds->transport->done_mu_);
      ds->transport->outcomes_.push_back({ds->peer, 0, status, ds->context, true});
    }
    delete ds;
    ucp_request_free(request);
  }

  // UCX callbacks record what happened under done_mu_ only (never held across a UCX call), and poll() applies it
  // under mu_: a callback run inside a UCX call made by a thread holding mu_, or by the worker's lock holder, can
  // then never deadlock.
  static void on_flushed(void* request, ucs_status_t status, void* user_data) {
    auto* fr = static_cast<FlushRequest*>(user_data);
    {
      std::lock_guard<std::mutex> lock(fr->transport->done_mu_);
      fr->transport->outcomes_.push_back({fr->peer, fr->puts, status, nullptr, false});
    }
    delete fr;
    ucp_request_free(request);
  }

  static void on_am_sent(void* request, ucs_status_t status, void* user_data) {
    auto* am = static_cast<AmSend*>(user_data);
    if (status == UCS_OK) am->peer->sent = true;
    --am->transport->ams_in_flight_;
    delete am;
    ucp_request_free(request);
  }

  // UCX declares the endpoint dead (error mode peer).
  static void on_ep_error(void* arg, ucp_ep_h ep, ucs_status_t status) {
    auto* peer = static_cast<UcxPeer*>(arg);
    std::lock_guard<std::mutex> lock(peer->owner->done_mu_);
    peer->owner->outcomes_.push_back({peer, 0, status, nullptr, false});
  }

  // Under mu_: flushes that completed move their peers' `flushed` on; failures fail the peer.
  void apply_outcomes() {
    std::vector<Outcome> outcomes;
    {
      std::lock_guard<std::mutex> lock(done_mu_);
      outcomes.swap(outcomes_);
    }
    for (const auto& o : outcomes) {
      if (o.data_write) {  // a data AM left (or failed with its endpoint)
        if (o.peer->abandoned.erase(o.context)) {  // reported failed when the peer was removed
          if (o.peer->close_when_idle && o.peer->abandoned.empty()) close_endpoint(*o.peer);
          continue;
        }
        o.peer->in_flight.erase(o.context);
        --queued_;
        if (o.status == UCS_OK) {
          write_done(o.context);
        } else {
          fail_peer(*o.peer, "a write failed: " + status_text(o.status));
          report_failed(*o.peer, o.context);
        }
        continue;
      }
      if (o.status == UCS_OK) o.peer->flushed = std::max(o.peer->flushed, o.puts);
      else fail_peer(*o.peer, (o.puts ? "flush failed: " : "the peer is unreachable: ") + status_text(o.status));
    }
  }

  // The endpoint's lane lines from ucp_ep_print_info, each from "lane[" on, e.g.
  // "lane[0]:  3:tcp/lo.0 md[1]  -> md[1]/tcp/sysdev[255] rma_bw#0 am am_bw#0".
  static std::vector<std::string> lane_lines(ucp_ep_h ep) {
    const std::string text = print_to_string([ep](FILE* f) { ucp_ep_print_info(ep, f); });
    std::vector<std::string> lines;
    size_t pos = 0;
    while ((pos = text.find("lane[", pos)) != std::string::npos) {
      const size_t eol = std::min(text.find('\n', pos), text.size());
      lines.push_back(text.substr(pos, eol - pos));
      pos = eol;
    }
    return lines;
  }

  // True when one of the endpoint's lanes does RMA in hardware (rma_bw / rma lanes): UCX's puts are then real.
  static bool has_rma_lane(ucp_ep_h ep) {
    for (const auto& line : lane_lines(ep))
      if (line.find(" rma") != std::string::npos) return true;
    return false;
  }

  // "ucx lanes: tcp/lo (am, rma)": which of UCX's transports carry what, from ucp_ep_print_info, so a slow fallback
  // (tcp where rc was expected) is visible instead of silent.
  static std::string describe_lanes(ucp_ep_h ep) {
    std::vector<std::string> order;
    std::unordered_map<std::string, std::set<std::string>> uses;
    for (const auto& line : lane_lines(ep)) {
      const size_t colon = line.find(':', line.find("]:") + 2);
      if (colon == std::string::npos) continue;
      const size_t end = line.find(' ', colon);
      std::string tl = line.substr(colon + 1, end == std::string::npos ? std::string::npos : end - colon - 1);
      if (auto dot = tl.rfind('.'); dot != std::string::npos && tl.find('/') < dot) tl = tl.substr(0, dot);
      if (!uses.count(tl)) order.push_back(tl);
      for (const char* u : {"rma", "am", "amo", "rkey_ptr", "keepalive"})
        if (line.find(std::string(" ") + u) != std::string::npos) uses[tl].insert(u);
    }
    std::string out = "ucx lanes:";
    for (const auto& tl : order) {
      out += " " + tl + " (";
      bool first = true;
      for (const auto& u : uses[tl]) {
        out += (first ? "" : ", ") + u;
        first = false;
      }
      out += ");";
    }
    if (!order.empty()) out.pop_back();
    return order.empty() ? std::string{} : out;
  }


 public:
  // "tcp/lo, sysv/memory, cma/memory": the UCX resources this context opened (ucp_context_print_info).
  std::string resources() const {
    std::string out;
    for (const auto& tl : resource_names()) {
      if (tl.rfind("self/", 0) == 0) continue;  // loopback within one worker: never a peer's path
      out += (out.empty() ? "" : ", ") + tl;
    }
    return out;
  }

  // Every resource of the context, "tcp/lo" style.
  std::vector<std::string> resource_names() const {
    std::string text = print_to_string([this](FILE* f) { ucp_context_print_info(context_, f); });
    std::vector<std::string> out;
    size_t pos = 0;
    while ((pos = text.find("resource ", pos)) != std::string::npos) {
      const size_t eol = std::min(text.find('\n', pos), text.size());
      const std::string line = text.substr(pos, eol - pos);
      pos = eol;
      out.push_back(line.substr(line.find_last_of(' ') + 1));
    }
    return out;
  }

 private:
  template <typename Print>
  static std::string print_to_string(Print print) {
    char* buf = nullptr;
    size_t len = 0;
    FILE* f = open_memstream(&buf, &len);
    if (!f) return {};
    print(f);
    fclose(f);
    std::string text(buf, len);
    free(buf);
    return text;
  }

  Capabilities caps_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  int efd_ = -1;
  mutable std::mutex mu_;  // peers_, exported_, every peer's queue and keys
  struct Outcome {
    UcxPeer* peer;
    uint64_t puts;  // a flush: the puts it covered; 0: an endpoint error
    ucs_status_t status;
    void* context;    // a data AM: its write's completion context
    bool data_write;  // a data AM, not a flush or an endpoint error
  };
  std::mutex done_mu_;  // outcomes_, filled by UCX callbacks
  std::vector<Outcome> outcomes_;
  std::vector<std::unique_ptr<UcxPeer>> peers_;
  std::unordered_map<uint64_t, Exported> exported_;
  size_t queued_ = 0;  // writes waiting for their immediate (or their data AM) to leave: the in-flight window
  std::string writes_mode_ = "auto";  // KVXFER_UCX_WRITES
  std::mutex regions_mu_;  // regions_: read by the data AM handler, changed by (de)registration
  std::unordered_map<uint64_t, ucx_data::Region> regions_;  // host memory exported under each key
  std::vector<void*> closing_;  // ucp_ep_close_nbx requests still in progress
  std::deque<PendingEvent> pending_;             // progress thread only
  std::vector<std::vector<uint8_t>> delivered_;  // messages handed out by the last poll
  std::atomic<uint64_t> writes_{0}, imms_{0};
  std::atomic<size_t> ams_in_flight_{0};  // active messages UCX has not sent yet (it calls on_am_sent when it did)
};

}  // namespace

}  // namespace kvxfer

// The plugin's C entry points (ucx_plugin.h). No exception leaves them: errors come back as kind + message.
namespace {
void fill(KvxferUcxError* err, const kvxfer::Error& e) {
  err->kind = static_cast<int>(e.kind());
  std::snprintf(err->message, sizeof(err->message), "%s", e.what());
}
}  // namespace

extern "C" KVXFER_UCX_EXPORT kvxfer::Transport* kvxfer_ucx_open(const char* interface, KvxferUcxError* err) {
  try {
    return new kvxfer::UcxTransport(interface ? interface : "");
  } catch (const kvxfer::Error& e) {
    fill(err, e);
  } catch (const std::exception& e) {
    err->kind = static_cast<int>(kvxfer::ErrorKind::TransportUnavailable);
    std::snprintf(err->message, sizeof(err->message), "UCX transport: %s", e.what());
  }
  return nullptr;
}

extern "C" KVXFER_UCX_EXPORT void kvxfer_ucx_version(char* out, size_t len) {
  unsigned major = 0, minor = 0, release = 0;
  ucp_get_version(&major, &minor, &release);
  std::snprintf(out, len, "%u.%u.%u", major, minor, release);
}

extern "C" KVXFER_UCX_EXPORT int kvxfer_ucx_resources(char* out, size_t len) {
  try {
    kvxfer::UcxTransport t("");
    // The resources, then on a line of its own how peers are keyed: "own" or "shared" (probe_ucx says what it means).
    std::snprintf(out, len, "%s\n%s", t.resources().c_str(), t.capabilities().fences_peers ? "own" : "shared");
    return 1;
  } catch (const std::exception& e) {
    std::snprintf(out, len, "%s", e.what());
    return 0;
  }
}
