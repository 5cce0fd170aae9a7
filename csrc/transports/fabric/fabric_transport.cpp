#include "transports/fabric/fabric_transport.h"

#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_rma.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <unordered_map>
#include <cstring>
#include <vector>

#include "transports/fabric/fabric_error.h"
#include "transports/fabric/provider.h"
#include "transports/fabric/split_writes.h"

namespace kvxfer {
namespace {

constexpr size_t kRecvBuffers = 64;  // per rail
constexpr size_t kSendBuffers = 64;
constexpr size_t kCqSize = 4096;
constexpr uint32_t kMaxRails = 16;
constexpr uint64_t kMaxWriteBytes = 8ull << 20;

struct MsgBuffer {
  alignas(16) uint8_t context[Transport::kContextBytes];  // fi_context2 while posted
  uint8_t data[Transport::kMaxMessageBytes];
};

// One endpoint with its own CQ and AV. Rails share the fabric and the domain, so one memory registration (and
// one remote key) serves every rail.
struct Rail {
  fid_cq* cq = nullptr;
  int wait_fd = -1;  // the CQ's wait object (FI_WAIT_FD), -1 when the provider has none
  fid_av* av = nullptr;
  fid_ep* ep = nullptr;
  std::unordered_map<fi_addr_t, PeerAddr> peer_of;  // this rail's AV entries -> our peer handle
  // How many of our peer handles hold each AV entry: a peer's incarnation added again before its earlier handle was
  // removed gets the same entry back from libfabric, whose fi_av_remove would then close the connection both use
  // (rxm) or unmap the peer's region under the live handle (shm 1.17 unmaps whatever the entry's use count).
  std::unordered_map<fi_addr_t, uint32_t> holders;
  std::atomic<uint64_t> writes{0}, imms{0};
};

// KVXFER_TCP_IMM: "split" (default: SplitWrites on rxm over tcp) or "inline" (one fi_writedata per write, which a
// peer released mid-message can crash; for measuring what the split costs).
bool split_immediates_wanted() { return env_is_first("KVXFER_TCP_IMM", "split", "inline"); }

// The endpoint (opened with this info, so with its ordering) reports a write's immediate only after the writes
// posted before it landed: tcp (one byte stream per connection, read in order) and verbs' RC queue pairs say so;
// shm does not (its tx msg_order is FI_ORDER_SAS only, its max_order_waw_size 0). efa is left out whatever it
// reports: SRD delivers out of order, and immediates on efa have lost counts under batching (nixl#1862).
bool orders_writes(const fi_info* info, uint64_t max_write_bytes) {
  if (std::strncmp(info->fabric_attr->prov_name, "efa", 3) == 0) return false;
  const uint64_t order = info->tx_attr->msg_order;
  return (order & (FI_ORDER_RMA_WAW | FI_ORDER_WAW)) != 0 && info->ep_attr->max_order_waw_size >= max_write_bytes;
}

class FabricTransport final : public Transport {
 public:
  FabricTransport(fi_info* info, const std::string& kvxfer_name, uint32_t rails) : info_(info) {
    KVXFER_CHECK(rails >= 1 && rails <= kMaxRails, InvalidArgument,
                 "rails=" << rails << " is out of range; use 1 to " << kMaxRails << " endpoints");
    caps_.provider = info_->fabric_attr->prov_name;
    caps_.name = kvxfer_name == "shm" ? "fi_shm" : kvxfer_name;
    caps_.domain = info_->domain_attr->name ? info_->domain_attr->name : "";
    const int mr_mode = info_->domain_attr->mr_mode;
    caps_.remote_virt_addr = (mr_mode & FI_MR_VIRT_ADDR) != 0;
    mr_local_ = (mr_mode & FI_MR_LOCAL) != 0;
    prov_key_ = (mr_mode & FI_MR_PROV_KEY) != 0;
    // Keys we choose can be one per peer, derived on both sides (peer_key): no key exchange on connect.
    caps_.fences_peers = !prov_key_ && own_peer_keys_wanted();
    caps_.max_write_bytes = std::min<uint64_t>(info_->ep_attr->max_msg_size, kMaxWriteBytes);
    caps_.max_inflight = std::max<size_t>(16, std::min<size_t>(info_->tx_attr->size, 1024)) * rails;
    caps_.num_rails = rails;
    caps_.hmem = (info_->caps & FI_HMEM) != 0;
    inject_size_ = info_->tx_attr->inject_size;
    if (caps_.provider.rfind("tcp", 0) == 0 && split_immediates_wanted())
      split_ = std::make_unique<SplitWrites>(caps_.max_inflight + 64);
    caps_.ordered_writes = orders_writes(info_, caps_.max_write_bytes);
    caps_.max_iov = std::max<size_t>(1, std::min<size_t>({static_cast<size_t>(info_->tx_attr->iov_limit), static_cast<size_t>(info_->tx_attr->rma_iov_limit), size_t{16}}));
    const auto& prov = caps_.provider;
    KVXFER_FI_CALL(TransportUnavailable, fi_fabric(info_->fabric_attr, &fabric_, nullptr), prov);
    KVXFER_FI_CALL(TransportUnavailable, fi_domain(fabric_, info_, &domain_, nullptr), prov);
    rails_ = std::vector<Rail>(rails);
    for (auto& rail : rails_) open_endpoint(rail);
    post_initial_receives();
  }

  ~FabricTransport() override {
    shutdown();
    if (msg_mr_) fi_close(&msg_mr_->fid);
    if (send_mr_key_.handle) fi_close(&static_cast<fid_mr*>(send_mr_key_.handle)->fid);
    if (domain_) fi_close(&domain_->fid);
    if (fabric_) fi_close(&fabric_->fid);
    fi_freeinfo(info_);
  }

  const Capabilities& capabilities() const override { return caps_; }

  void shutdown() override {
    for (auto& rail : rails_) {
      if (rail.ep) fi_close(&rail.ep->fid);
      if (rail.av) fi_close(&rail.av->fid);
      if (rail.cq) fi_close(&rail.cq->fid);
      rail.ep = nullptr;
      rail.av = nullptr;
      rail.cq = nullptr;
      rail.wait_fd = -1;
    }
  }

  // u8 rail count, then per rail: u16 length | endpoint name.
  std::vector<uint8_t> address() const override {
    std::vector<uint8_t> out{static_cast<uint8_t>(rails_.size())};
    for (const auto& rail : rails_) {
      std::vector<uint8_t> name(256);
      size_t len = name.size();
      KVXFER_FI_CALL(TransportUnavailable, fi_getname(&rail.ep->fid, name.data(), &len), caps_.provider);
      out.push_back(static_cast<uint8_t>(len & 0xff));
      out.push_back(static_cast<uint8_t>(len >> 8));
      out.insert(out.end(), name.begin(), name.begin() + len);
    }
    return out;
  }

  MemoryKey register_memory(void* addr, size_t nbytes, uint64_t requested_key, int device) override {
    fid_mr* mr = nullptr;
    // With per-peer keys the shared registration is for our own writes only: remote access goes through each
    // peer's key (register_peer_key), so closing that key shuts out exactly that peer.
    const uint64_t access = FI_WRITE | FI_SEND | FI_RECV | (caps_.fences_peers ? 0 : FI_REMOTE_WRITE);
    int rc;
    if (device < 0) {
      rc = fi_mr_reg(domain_, addr, nbytes, access, 0, prov_key_ ? 0 : requested_key, 0, &mr, nullptr);
    } else {
      KVXFER_CHECK(caps_.hmem, TransportUnavailable,
                   "provider " << caps_.provider << " cannot register GPU memory (no FI_HMEM); the agent stages "
                               "GPU pools through pinned host buffers instead");
      // GPU-direct RDMA: the NIC reads and writes the GPU's memory itself (FI_HMEM_CUDA; the provider picks
      // dma-buf or peer memory).
      iovec iov{addr, nbytes};
      fi_mr_attr attr{};
      attr.mr_iov = &iov;
      attr.iov_count = 1;
      attr.access = access;
      attr.requested_key = prov_key_ ? 0 : requested_key;
      attr.iface = FI_HMEM_CUDA;
      attr.device.cuda = device;
      rc = fi_mr_regattr(domain_, &attr, 0, &mr);
    }
    KVXFER_CHECK(rc == 0, RegistrationFailed,
                 "fi_mr_reg of " << nbytes << " bytes at " << addr << (device >= 0 ? " (cuda:" + std::to_string(device) + ")" : "")
                                 << " failed: rc=" << rc << " (" << fi_strerror(-rc) << ") on provider " << caps_.provider
                                 << "; check that the memory is allocated and not already registered");
    return MemoryKey{mr, fi_mr_desc(mr), fi_mr_key(mr)};
  }

  MemoryKey register_peer_key(void* addr, size_t nbytes, uint64_t key) override {
    KVXFER_ASSERT(caps_.fences_peers);
    fid_mr* mr = nullptr;
    const int rc = fi_mr_reg(domain_, addr, nbytes, FI_REMOTE_WRITE, 0, key, 0, &mr, nullptr);
    KVXFER_CHECK(rc == 0, RegistrationFailed,
                 "fi_mr_reg of a peer's key (" << nbytes << " bytes at " << addr << ", key " << std::hex << key
                                               << std::dec << ") failed: rc=" << rc << " (" << fi_strerror(-rc)
                                               << ") on provider " << caps_.provider
                                               << "; -FI_ENOKEY: the key is taken (two peers' keys collided): restart that peer's agent, whose new epoch "
                                                  "derives new keys");
    return MemoryKey{mr, fi_mr_desc(mr), fi_mr_key(mr)};
  }

  void deregister_memory(MemoryKey& key) override {
    if (key.handle) fi_close(&static_cast<fid_mr*>(key.handle)->fid);
    key = MemoryKey{};
  }

  PeerAddr insert_peer(const std::vector<uint8_t>& address) override {
    std::vector<std::vector<uint8_t>> names = parse_address(address);
    const PeerAddr handle = peers_.size();
    std::vector<fi_addr_t> addrs;
    for (size_t r = 0; r < std::min(names.size(), rails_.size()); ++r) {
      fi_addr_t addr = FI_ADDR_UNSPEC;
      int n = fi_av_insert(rails_[r].av, names[r].data(), 1, &addr, 0, nullptr);
      KVXFER_CHECK(n == 1, PeerUnknown,
                   "fi_av_insert of the peer's " << caps_.provider << " address (rail " << r << ") failed (" << n
                                                 << "); the peer may use another provider or network");
      rails_[r].peer_of[addr] = handle;
      rails_[r].holders[addr]++;
      addrs.push_back(addr);
    }
    peers_.push_back(std::move(addrs));
    return handle;
  }

  void remove_peer(PeerAddr peer) override {
    if (peer >= peers_.size()) return;
    for (size_t r = 0; r < peers_[peer].size(); ++r) {
      fi_addr_t addr = peers_[peer][r];
      Rail& rail = rails_[r];
      if (--rail.holders[addr] > 0) {  // another handle of ours uses the entry: it stays, named after that one
        if (rail.peer_of[addr] == peer)
          for (PeerAddr other = 0; other < peers_.size(); ++other)
            if (other != peer && r < peers_[other].size() && peers_[other][r] == addr) rail.peer_of[addr] = other;
        continue;
      }
      rail.holders.erase(addr);
      fi_av_remove(rail.av, &addr, 1, 0);
      rail.peer_of.erase(addr);
    }
    peers_[peer].clear();
  }

  uint32_t peer_rails(PeerAddr peer) const override {
    return peer < peers_.size() ? static_cast<uint32_t>(peers_[peer].size()) : 0;
  }

  int post_write(const void* src, size_t nbytes, void* desc, uint32_t imm, PeerAddr peer, uint64_t remote_addr,
                 uint64_t rkey, void* context, uint32_t rail) override {
    Rail& r = rails_[rail];
    if (split_ && nbytes > 0) {
      WriteIov w{src, nbytes, desc, remote_addr, rkey};
      return post_split(&w, 1, imm, peer, context, rail);
    }
    ssize_t rc = fi_writedata(r.ep, src, nbytes, desc, imm, fi_peer(peer, rail), remote_addr, rkey, context);
    if (rc == -FI_EAGAIN) return -EAGAIN;
    KVXFER_CHECK(rc == 0, TransferFailed,
                 "fi_writedata(" << nbytes << " bytes) failed: rc=" << rc << " (" << fi_strerror(-rc)
                                 << ") on provider " << caps_.provider);
    r.writes.fetch_add(1, std::memory_order_relaxed);
    return 0;
  }

  int post_writev(const WriteIov* w, size_t n, uint32_t imm, PeerAddr peer, void* context, uint32_t rail) override {
    if (split_) return post_split(w, n, imm, peer, context, rail);
    return post_pieces(w, n, peer, rail, context, FI_REMOTE_CQ_DATA, imm);
  }

  int post_plain_writev(const WriteIov* w, size_t n, PeerAddr peer, void* context, uint32_t rail) override {
    KVXFER_ASSERT(caps_.ordered_writes);
    return post_pieces(w, n, peer, rail, context, 0, 0);
  }

  // write_pieces, counted on its rail: 0, -EAGAIN, or throws TransferFailed.
  int post_pieces(const WriteIov* w, size_t n, PeerAddr peer, uint32_t rail, void* context, uint64_t flags,
                  uint64_t data) {
    const ssize_t rc = write_pieces(w, n, peer, rail, context, flags, data);
    if (rc == -FI_EAGAIN) return -EAGAIN;
    check_posted(rc, n);
    rails_[rail].writes.fetch_add(1, std::memory_order_relaxed);
    return 0;
  }

  // One fi_writemsg of n pieces (FI_REMOTE_CQ_DATA in flags: with the immediate `data`); the provider's rc.
  ssize_t write_pieces(const WriteIov* w, size_t n, PeerAddr peer, uint32_t rail, void* context, uint64_t flags,
                       uint64_t data) {
    KVXFER_ASSERT(n >= 1 && n <= caps_.max_iov);
    iovec iov[16];
    void* desc[16];
    fi_rma_iov rma[16];
    for (size_t i = 0; i < n; ++i) {
      iov[i] = {const_cast<void*>(w[i].src), w[i].nbytes};
      desc[i] = w[i].desc;
      rma[i] = {w[i].remote_addr, w[i].nbytes, w[i].rkey};
    }
    fi_msg_rma msg{};
    msg.msg_iov = iov;
    msg.desc = desc;
    msg.iov_count = n;
    msg.addr = fi_peer(peer, rail);
    msg.rma_iov = rma;
    msg.rma_iov_count = n;
    msg.context = context;
    msg.data = data;
    return fi_writemsg(rails_[rail].ep, &msg, flags | FI_COMPLETION);
  }

  void check_posted(ssize_t rc, size_t n) const {
    KVXFER_CHECK(rc == 0, TransferFailed,
                 "fi_writemsg(" << n << " iovs) failed: rc=" << rc << " (" << fi_strerror(-rc) << ") on provider "
                                << caps_.provider);
  }

  // Control messages travel on rail 0, but for the HELLO each rail sends to connect itself.
  int post_message(const void* msg, size_t nbytes, PeerAddr peer, void* context, uint32_t rail) override {
    KVXFER_ASSERT(nbytes <= kMaxMessageBytes);
    fid_ep* ep = rails_[rail].ep;
    ssize_t rc;
    if (nbytes <= inject_size_) {
      rc = fi_inject(ep, msg, nbytes, fi_peer(peer, rail));
    } else {
      MsgBuffer& b = send_buffers_[next_send_++ % kSendBuffers];
      std::memcpy(b.data, msg, nbytes);
      rc = fi_send(ep, b.data, nbytes, send_mr_key_.desc, fi_peer(peer, rail), b.context);
    }
    if (rc == -FI_EAGAIN) return -EAGAIN;
    KVXFER_CHECK(rc == 0, TransferFailed,
                 "fi_send of a control message failed: rc=" << rc << " (" << fi_strerror(-rc) << ") on provider "
                                                            << caps_.provider);
    return 0;
  }

  size_t poll(Event* events, size_t max) override {
    repost_consumed_receives();
    size_t failed = split_ ? post_deferred_immediates(events, max) : 0;
    if (failed) return failed;
    size_t out = 0;
    for (size_t k = 0; k < rails_.size() && out < max; ++k) {
      const size_t r = (next_poll_ + k) % rails_.size();
      out += poll_rail(r, events + out, max - out);
    }
    next_poll_ = (next_poll_ + 1) % rails_.size();
    return out;
  }

  std::vector<int> wait_fds() const override {
    std::vector<int> fds;
    for (const auto& r : rails_) {
      if (r.wait_fd < 0) return {};
      fds.push_back(r.wait_fd);
    }
    return fds;
  }

  bool ready_to_wait() override {
    fid* fids[kMaxRails];
    for (size_t i = 0; i < rails_.size(); ++i) fids[i] = &rails_[i].cq->fid;
    return fi_trywait(fabric_, fids, static_cast<int>(rails_.size())) == FI_SUCCESS;
  }

  std::vector<RailStats> rail_stats() const override {
    std::vector<RailStats> out;
    for (const auto& r : rails_) out.push_back({r.writes.load(), r.imms.load()});
    return out;
  }

 private:
  fi_addr_t fi_peer(PeerAddr peer, uint32_t rail) const {
    KVXFER_CHECK(peer < peers_.size() && rail < peers_[peer].size(), PeerUnknown,
                 "no rail " << rail << " towards this peer (it was removed or exposes fewer endpoints)");
    return peers_[peer][rail];
  }

  static std::vector<std::vector<uint8_t>> parse_address(const std::vector<uint8_t>& a) {
    KVXFER_CHECK(!a.empty() && a[0] >= 1 && a[0] <= kMaxRails, MetadataError,
                 "peer fabric address names " << (a.empty() ? 0 : a[0]) << " endpoints; expected 1 to " << kMaxRails);
    std::vector<std::vector<uint8_t>> names;
    size_t at = 1;
    for (uint32_t r = 0; r < a[0]; ++r) {
      KVXFER_CHECK(at + 2 <= a.size(), MetadataError, "peer fabric address truncated in endpoint " << r);
      const size_t len = a[at] | (static_cast<size_t>(a[at + 1]) << 8);
      at += 2;
      KVXFER_CHECK(len > 0 && at + len <= a.size(), MetadataError,
                   "peer fabric address: endpoint " << r << " claims " << len << " bytes, " << a.size() - at
                                                    << " remain");
      names.emplace_back(a.begin() + at, a.begin() + at + len);
      at += len;
    }
    KVXFER_CHECK(at == a.size(), MetadataError, "peer fabric address has " << a.size() - at << " trailing bytes");
    return names;
  }

  void open_endpoint(Rail& rail) {
    const auto& prov = caps_.provider;
    fi_cq_attr cq_attr{};
    cq_attr.format = FI_CQ_FORMAT_DATA;
    cq_attr.size = kCqSize;
    // A wait fd lets an idle agent block instead of polling (tcp;ofi_rxm has one; shm answers -FI_ENOSYS).
    cq_attr.wait_obj = idle_wait_fd_wanted() ? FI_WAIT_FD : FI_WAIT_NONE;
    if (cq_attr.wait_obj == FI_WAIT_FD && fi_cq_open(domain_, &cq_attr, &rail.cq, nullptr) == 0) {
      if (fi_control(&rail.cq->fid, FI_GETWAIT, &rail.wait_fd) != 0) rail.wait_fd = -1;
    } else {
      rail.cq = nullptr;
      cq_attr.wait_obj = FI_WAIT_NONE;
      KVXFER_FI_CALL(TransportUnavailable, fi_cq_open(domain_, &cq_attr, &rail.cq, nullptr), prov);
    }
    fi_av_attr av_attr{};
    av_attr.type = FI_AV_TABLE;
    KVXFER_FI_CALL(TransportUnavailable, fi_av_open(domain_, &av_attr, &rail.av, nullptr), prov);
    KVXFER_FI_CALL(TransportUnavailable, fi_endpoint(domain_, info_, &rail.ep, nullptr), prov);
    KVXFER_FI_CALL(TransportUnavailable, fi_ep_bind(rail.ep, &rail.cq->fid, FI_TRANSMIT | FI_RECV), prov);
    KVXFER_FI_CALL(TransportUnavailable, fi_ep_bind(rail.ep, &rail.av->fid, 0), prov);
    KVXFER_FI_CALL(TransportUnavailable, fi_enable(rail.ep), prov);
  }

  // Every rail gets receives: control messages use rail 0, but providers that keep FI_RX_CQ_DATA consume a
  // receive for each remote CQ data entry on whichever rail the write arrives.
  void post_initial_receives() {
    recv_buffers_.resize(kRecvBuffers * rails_.size());
    send_buffers_.resize(kSendBuffers);
    if (mr_local_) {
      msg_mr_ = static_cast<fid_mr*>(register_memory(recv_buffers_.data(), sizeof(MsgBuffer) * recv_buffers_.size(),
                                                     0xC0DE0001, -1).handle);
      msg_desc_ = fi_mr_desc(msg_mr_);
      send_mr_key_ = register_memory(send_buffers_.data(), sizeof(MsgBuffer) * kSendBuffers, 0xC0DE0002, -1);
    }
    for (size_t i = 0; i < recv_buffers_.size(); ++i) post_receive(i);
  }

  void post_receive(size_t i) {
    MsgBuffer& b = recv_buffers_[i];
    Rail& rail = rails_[i / kRecvBuffers];
    ssize_t rc;
    do {
      rc = fi_recv(rail.ep, b.data, kMaxMessageBytes, msg_desc_, FI_ADDR_UNSPEC, b.context);
      if (rc == -FI_EAGAIN) fi_cq_read(rail.cq, nullptr, 0);  // drive progress, then retry
    } while (rc == -FI_EAGAIN);
    KVXFER_CHECK(rc == 0, TransportUnavailable,
                 "fi_recv failed: rc=" << rc << " (" << fi_strerror(-rc) << ") on " << caps_.provider);
  }

  void repost_consumed_receives() {
    for (size_t i : consumed_) post_receive(i);
    consumed_.clear();
  }

  size_t recv_index(void* ctx) const {
    auto* p = static_cast<MsgBuffer*>(ctx);
    if (p >= recv_buffers_.data() && p < recv_buffers_.data() + recv_buffers_.size())
      return static_cast<size_t>(p - recv_buffers_.data());
    return SIZE_MAX;
  }
  bool is_send_buffer(void* ctx) const {
    auto* p = static_cast<MsgBuffer*>(ctx);
    return p >= send_buffers_.data() && p < send_buffers_.data() + send_buffers_.size();
  }

  size_t poll_rail(size_t r, Event* events, size_t max) {
    Rail& rail = rails_[r];
    fi_cq_data_entry entries[64];
    fi_addr_t sources[64];
    const size_t want = std::min<size_t>(max, 64);
    ssize_t n = fi_cq_readfrom(rail.cq, entries, want, sources);
    if (n == -FI_EAGAIN) return 0;
    if (n == -FI_EAVAIL) return read_error(rail, events);
    KVXFER_CHECK(n > 0, TransferFailed,
                 "fi_cq_readfrom failed: rc=" << n << " (" << fi_strerror(-n) << ") on " << caps_.provider);
    size_t out = 0;
    for (ssize_t i = 0; i < n; ++i) out += decode(rail, entries[i], sources[i], &events[out]);
    return out;
  }

  PeerAddr source_of(const Rail& rail, fi_addr_t source) const {
    if (source == FI_ADDR_NOTAVAIL) return kUnknownPeer;
    auto it = rail.peer_of.find(source);
    return it == rail.peer_of.end() ? kUnknownPeer : it->second;
  }

  size_t decode(Rail& rail, const fi_cq_data_entry& e, fi_addr_t source, Event* ev) {
    if (SplitWrites::Pair* p = split_ ? split_->owner(e.op_context) : nullptr) return finish_half(p, "", ev);
    const size_t ri = recv_index(e.op_context);
    if (e.flags & FI_REMOTE_CQ_DATA) {
      // Match on FI_REMOTE_CQ_DATA alone: rxm leaves FI_RMA out of these flags.
      if (ri != SIZE_MAX) consumed_.push_back(ri);  // FI_RX_CQ_DATA providers used up a receive
      ev->kind = Event::Kind::RemoteData;
      ev->imm = static_cast<uint32_t>(e.data);
      ev->source = source_of(rail, source);
      rail.imms.fetch_add(1, std::memory_order_relaxed);
      return 1;
    }
    if (ri != SIZE_MAX) {
      consumed_.push_back(ri);
      ev->kind = Event::Kind::Message;
      ev->msg = recv_buffers_[ri].data;
      ev->msg_len = e.len;
      ev->source = source_of(rail, source);
      return 1;
    }
    if (is_send_buffer(e.op_context)) return 0;  // a control message left; nothing to report
    ev->kind = (e.flags & FI_SEND) ? Event::Kind::SendDone : Event::Kind::WriteDone;
    ev->context = e.op_context;
    return 1;
  }

  size_t read_error(Rail& rail, Event* ev) {
    fi_cq_err_entry err{};
    ssize_t rc = fi_cq_readerr(rail.cq, &err, 0);
    if (rc < 0) return 0;
    const size_t ri = recv_index(err.op_context);
    if (ri != SIZE_MAX) {  // a receive failed (peer gone mid-message): repost it and go on
      consumed_.push_back(ri);
      return 0;
    }
    if (is_send_buffer(err.op_context)) return 0;
    char buf[256];
    const char* prov_err = fi_cq_strerror(rail.cq, err.prov_errno, err.err_data, buf, sizeof(buf));
    std::string why = std::string("write failed on provider ") + caps_.provider + ": " + fi_strerror(err.err) +
                      " (err=" + std::to_string(err.err) + ", provider: " + (prov_err ? prov_err : "?") + ")";
    if (SplitWrites::Pair* p = split_ ? split_->owner(err.op_context) : nullptr) return finish_half(p, why, ev);
    ev->kind = Event::Kind::OpError;
    ev->context = err.op_context;
    ev->error = std::move(why);
    return 1;
  }

  // SplitWrites: the data as a plain write (one piece or gathered), then the immediate in a zero-byte write to the
  // first piece's place. EAGAIN before the data went means nothing was posted; once it went, a refused zero-byte
  // write waits in deferred() and poll() posts it again (still after its data on the same connection).
  int post_split(const WriteIov* w, size_t n, uint32_t imm, PeerAddr peer, void* context, uint32_t rail) {
    SplitWrites::Pair* p = split_->take(context);
    if (!p) return -EAGAIN;
    ssize_t rc;
    try {
      rc = write_pieces(w, n, peer, rail, p->data_ctx, 0, 0);
    } catch (...) {  // fi_peer: the peer is unknown
      split_->give_back(p);
      throw;
    }
    if (rc != 0) split_->give_back(p);
    if (rc == -FI_EAGAIN) return -EAGAIN;
    check_posted(rc, n);
    rails_[rail].writes.fetch_add(1, std::memory_order_relaxed);
    p->peer = peer;
    p->rail = rail;
    p->imm = imm;
    p->src = w[0].src;
    p->desc = w[0].desc;
    p->remote_addr = w[0].remote_addr;
    p->rkey = w[0].rkey;
    bool later = !split_->deferred().empty();
    try {
      later = later || post_immediate(*p) == -EAGAIN;
    } catch (const Error&) {
      later = true;  // its data is in flight: poll() posts it again and reports the failure with the write's event
    }
    if (later) split_->deferred().push_back(p);
    return 0;
  }

  // The zero-byte half; throws TransferFailed (or PeerUnknown once the peer was removed) on other failures.
  int post_immediate(SplitWrites::Pair& p) {
    ssize_t rc = fi_writedata(rails_[p.rail].ep, p.src, 0, p.desc, p.imm, fi_peer(p.peer, p.rail), p.remote_addr,
                              p.rkey, p.imm_ctx);
    if (rc == -FI_EAGAIN) return -EAGAIN;
    KVXFER_CHECK(rc == 0, TransferFailed,
                 "fi_writedata(0 bytes, the immediate) failed: rc=" << rc << " (" << fi_strerror(-rc)
                                                                     << ") on provider " << caps_.provider);
    return 0;
  }

  // Posts the zero-byte halves the provider refused earlier, in order, until it refuses again. One that cannot be
  // posted at all (its peer removed meanwhile) ends its half with an error: the events it completes are returned.
  size_t post_deferred_immediates(Event* events, size_t max) {
    auto& waiting = split_->deferred();
    size_t done = 0, out = 0;
    for (; done < waiting.size() && out < max; ++done) {
      std::string why;
      try {
        if (post_immediate(*waiting[done]) == -EAGAIN) break;
        continue;
      } catch (const Error& e) {
        why = e.what();
      }
      out += finish_half(waiting[done], why, events + out);
    }
    waiting.erase(waiting.begin(), waiting.begin() + static_cast<std::ptrdiff_t>(done));
    return out;
  }

  // One half of a split write is over: the agent hears of the write once both are (0 or 1 event).
  size_t finish_half(SplitWrites::Pair* p, const std::string& why, Event* ev) {
    void* context = nullptr;
    std::string error;
    if (!split_->finish(p, why, &context, &error)) return 0;
    ev->context = context;
    ev->kind = error.empty() ? Event::Kind::WriteDone : Event::Kind::OpError;
    ev->error = std::move(error);
    return 1;
  }

  fi_info* info_;
  Capabilities caps_;
  bool mr_local_ = false, prov_key_ = false;
  std::unique_ptr<SplitWrites> split_;  // rxm over tcp: writes with immediates go as two (split_writes.h)
  size_t inject_size_ = 0;
  fid_fabric* fabric_ = nullptr;
  fid_domain* domain_ = nullptr;
  std::vector<Rail> rails_;
  std::vector<std::vector<fi_addr_t>> peers_;  // [PeerAddr][rail]
  fid_mr* msg_mr_ = nullptr;
  void* msg_desc_ = nullptr;
  MemoryKey send_mr_key_;
  std::vector<MsgBuffer> recv_buffers_, send_buffers_;
  std::vector<size_t> consumed_;
  size_t next_send_ = 0, next_poll_ = 0;
};

}  // namespace

std::unique_ptr<Transport> make_fabric_transport(const std::string& provider, uint32_t rails) {
  // provider may carry an interface: "tcp@lo".
  std::string name = provider, interface;
  if (auto at = provider.find('@'); at != std::string::npos) {
    name = provider.substr(0, at);
    interface = provider.substr(at + 1);
  }
  own_peer_keys_wanted();  // a bad KVXFER_PEER_KEYS is refused before anything is opened
  std::string reasons;
  for (const auto& p : provider_order()) {
    if (name.empty() ? std::string(p.kvxfer_name) == "shm" : name != p.kvxfer_name) continue;
    std::string why;
    if (fi_info* info = get_provider_info(p.kvxfer_name, interface, &why))
      return std::make_unique<FabricTransport>(info, p.kvxfer_name, rails);
    reasons += std::string(reasons.empty() ? "" : "; ") + p.kvxfer_name + ": " + why;
  }
  KVXFER_THROW(TransportUnavailable,
               "no usable libfabric provider"
                   << (name.empty() ? "" : " '" + name + "'") << " (" << reasons
                   << "); run `python -m kvxfer info` to see what this machine offers");
}

std::vector<ProviderProbe> probe_fabric_providers() {
  std::vector<ProviderProbe> out;
  for (const auto& p : provider_order()) {
    std::string why;
    fi_info* info = get_provider_info(p.kvxfer_name, "", &why);
    out.push_back({p.kvxfer_name, info != nullptr, info ? std::string(info->fabric_attr->prov_name) : why,
                   info && !(info->domain_attr->mr_mode & FI_MR_PROV_KEY) && own_peer_keys_wanted(),
                   info && orders_writes(info, std::min<uint64_t>(info->ep_attr->max_msg_size, kMaxWriteBytes)) &&
                       coalesced_imms_wanted(),
                   info ? provider_domains(p.kvxfer_name) : std::vector<std::string>{}});
    if (info) fi_freeinfo(info);
  }
  return out;
}

std::string fabric_version() {
  const uint32_t v = fi_version();
  return std::to_string(FI_MAJOR(v)) + "." + std::to_string(FI_MINOR(v));
}

}  // namespace kvxfer
