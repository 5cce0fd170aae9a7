#include "transports/fabric/fabric_transport.h"

#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_rma.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "transports/fabric/fabric_error.h"
#include "transports/fabric/provider.h"

namespace kvxfer {
namespace {

constexpr size_t kRecvBuffers = 64;
constexpr size_t kSendBuffers = 64;
constexpr size_t kCqSize = 4096;

struct MsgBuffer {
  alignas(16) uint8_t context[Transport::kContextBytes];  // fi_context2 while posted
  uint8_t data[Transport::kMaxMessageBytes];
};

class FabricTransport final : public Transport {
 public:
  FabricTransport(fi_info* info, const std::string& kvxfer_name) : info_(info) {
    caps_.provider = info_->fabric_attr->prov_name;
    caps_.name = kvxfer_name == "shm" ? "fi_shm" : kvxfer_name;
    const int mr_mode = info_->domain_attr->mr_mode;
    caps_.remote_virt_addr = (mr_mode & FI_MR_VIRT_ADDR) != 0;
    mr_local_ = (mr_mode & FI_MR_LOCAL) != 0;
    prov_key_ = (mr_mode & FI_MR_PROV_KEY) != 0;
    caps_.max_write_bytes = std::min<uint64_t>(info_->ep_attr->max_msg_size, 8ull << 20);
    caps_.max_inflight = std::max<size_t>(16, std::min<size_t>(info_->tx_attr->size, 1024));
    inject_size_ = info_->tx_attr->inject_size;
    caps_.max_iov = std::max<size_t>(1, std::min<size_t>({static_cast<size_t>(info_->tx_attr->iov_limit), static_cast<size_t>(info_->tx_attr->rma_iov_limit), size_t{16}}));
    open_endpoint();
    post_initial_receives();
  }

  ~FabricTransport() override {
    if (ep_) fi_close(&ep_->fid);
    if (msg_mr_) fi_close(&msg_mr_->fid);
    if (av_) fi_close(&av_->fid);
    if (cq_) fi_close(&cq_->fid);
    if (domain_) fi_close(&domain_->fid);
    if (fabric_) fi_close(&fabric_->fid);
    fi_freeinfo(info_);
  }

  const Capabilities& capabilities() const override { return caps_; }

  std::vector<uint8_t> address() const override {
    std::vector<uint8_t> addr(256);
    size_t len = addr.size();
    KVXFER_FI_CALL(TransportUnavailable, fi_getname(&ep_->fid, addr.data(), &len), caps_.provider);
    addr.resize(len);
    return addr;
  }

  MemoryKey register_memory(void* addr, size_t nbytes, uint64_t requested_key) override {
    fid_mr* mr = nullptr;
    const uint64_t access = FI_WRITE | FI_REMOTE_WRITE | FI_SEND | FI_RECV;
    int rc = fi_mr_reg(domain_, addr, nbytes, access, 0, prov_key_ ? 0 : requested_key, 0, &mr, nullptr);
    KVXFER_CHECK(rc == 0, RegistrationFailed,
                 "fi_mr_reg of " << nbytes << " bytes at " << addr << " failed: rc=" << rc << " ("
                                 << fi_strerror(-rc) << ") on provider " << caps_.provider
                                 << "; check that the memory is allocated and not already registered");
    return MemoryKey{mr, fi_mr_desc(mr), fi_mr_key(mr)};
  }

  void deregister_memory(MemoryKey& key) override {
    if (key.handle) fi_close(&static_cast<fid_mr*>(key.handle)->fid);
    key = MemoryKey{};
  }

  PeerAddr insert_peer(const std::vector<uint8_t>& address) override {
    fi_addr_t addr = FI_ADDR_UNSPEC;
    int n = fi_av_insert(av_, address.data(), 1, &addr, 0, nullptr);
    KVXFER_CHECK(n == 1, PeerUnknown,
                 "fi_av_insert of the peer's " << caps_.provider << " address failed (" << n
                                               << "); the peer may use another provider or network");
    return addr;
  }

  void remove_peer(PeerAddr peer) override {
    fi_addr_t addr = peer;
    fi_av_remove(av_, &addr, 1, 0);
  }

  int post_write(const void* src, size_t nbytes, void* desc, uint32_t imm, PeerAddr peer, uint64_t remote_addr,
                 uint64_t rkey, void* context) override {
    ssize_t rc = fi_writedata(ep_, src, nbytes, desc, imm, peer, remote_addr, rkey, context);
    if (rc == -FI_EAGAIN) return -EAGAIN;
    KVXFER_CHECK(rc == 0, TransferFailed,
                 "fi_writedata(" << nbytes << " bytes) failed: rc=" << rc << " (" << fi_strerror(-rc)
                                 << ") on provider " << caps_.provider);
    return 0;
  }

  int post_writev(const WriteIov* w, size_t n, uint32_t imm, PeerAddr peer, void* context) override {
    iovec iov[16];
    void* desc[16];
    fi_rma_iov rma[16];
    KVXFER_ASSERT(n >= 1 && n <= caps_.max_iov);
    for (size_t i = 0; i < n; ++i) {
      iov[i] = {const_cast<void*>(w[i].src), w[i].nbytes};
      desc[i] = w[i].desc;
      rma[i] = {w[i].remote_addr, w[i].nbytes, w[i].rkey};
    }
    fi_msg_rma msg{};
    msg.msg_iov = iov;
    msg.desc = desc;
    msg.iov_count = n;
    msg.addr = peer;
    msg.rma_iov = rma;
    msg.rma_iov_count = n;
    msg.context = context;
    msg.data = imm;
    ssize_t rc = fi_writemsg(ep_, &msg, FI_REMOTE_CQ_DATA | FI_COMPLETION);
    if (rc == -FI_EAGAIN) return -EAGAIN;
    KVXFER_CHECK(rc == 0, TransferFailed,
                 "fi_writemsg(" << n << " iovs) failed: rc=" << rc << " (" << fi_strerror(-rc) << ") on provider "
                                << caps_.provider);
    return 0;
  }

  int post_message(const void* msg, size_t nbytes, PeerAddr peer, void* context) override {
    KVXFER_ASSERT(nbytes <= kMaxMessageBytes);
    ssize_t rc;
    if (nbytes <= inject_size_) {
      rc = fi_inject(ep_, msg, nbytes, peer);
    } else {
      MsgBuffer& b = send_buffers_[next_send_++ % kSendBuffers];
      std::memcpy(b.data, msg, nbytes);
      rc = fi_send(ep_, b.data, nbytes, msg_desc_, peer, b.context);
    }
    if (rc == -FI_EAGAIN) return -EAGAIN;
    KVXFER_CHECK(rc == 0, TransferFailed,
                 "fi_send of a control message failed: rc=" << rc << " (" << fi_strerror(-rc) << ") on provider "
                                                            << caps_.provider);
    return 0;
  }

  size_t poll(Event* events, size_t max) override {
    repost_consumed_receives();
    fi_cq_data_entry entries[64];
    fi_addr_t sources[64];
    const size_t want = std::min<size_t>(max, 64);
    ssize_t n = fi_cq_readfrom(cq_, entries, want, sources);
    if (n == -FI_EAGAIN) return 0;
    if (n == -FI_EAVAIL) return read_error(events);
    KVXFER_CHECK(n > 0, TransferFailed,
                 "fi_cq_readfrom failed: rc=" << n << " (" << fi_strerror(-n) << ") on " << caps_.provider);
    size_t out = 0;
    for (ssize_t i = 0; i < n; ++i) out += decode(entries[i], sources[i], &events[out]);
    return out;
  }

 private:
  void open_endpoint() {
    const auto& prov = caps_.provider;
    KVXFER_FI_CALL(TransportUnavailable, fi_fabric(info_->fabric_attr, &fabric_, nullptr), prov);
    KVXFER_FI_CALL(TransportUnavailable, fi_domain(fabric_, info_, &domain_, nullptr), prov);
    fi_cq_attr cq_attr{};
    cq_attr.format = FI_CQ_FORMAT_DATA;
    cq_attr.size = kCqSize;
    cq_attr.wait_obj = FI_WAIT_NONE;
    KVXFER_FI_CALL(TransportUnavailable, fi_cq_open(domain_, &cq_attr, &cq_, nullptr), prov);
    fi_av_attr av_attr{};
    av_attr.type = FI_AV_TABLE;
    KVXFER_FI_CALL(TransportUnavailable, fi_av_open(domain_, &av_attr, &av_, nullptr), prov);
    KVXFER_FI_CALL(TransportUnavailable, fi_endpoint(domain_, info_, &ep_, nullptr), prov);
    KVXFER_FI_CALL(TransportUnavailable, fi_ep_bind(ep_, &cq_->fid, FI_TRANSMIT | FI_RECV), prov);
    KVXFER_FI_CALL(TransportUnavailable, fi_ep_bind(ep_, &av_->fid, 0), prov);
    KVXFER_FI_CALL(TransportUnavailable, fi_enable(ep_), prov);
  }

  void post_initial_receives() {
    recv_buffers_.resize(kRecvBuffers);
    send_buffers_.resize(kSendBuffers);
    if (mr_local_) {
      // Control buffers live in two vectors; register each once (FI_MR_LOCAL providers need a descriptor).
      msg_mr_ = static_cast<fid_mr*>(register_memory(recv_buffers_.data(), sizeof(MsgBuffer) * kRecvBuffers,
                                                     0xC0DE0001).handle);
      msg_desc_ = fi_mr_desc(msg_mr_);
      send_mr_key_ = register_memory(send_buffers_.data(), sizeof(MsgBuffer) * kSendBuffers, 0xC0DE0002);
    }
    for (size_t i = 0; i < kRecvBuffers; ++i) post_receive(i);
  }

  void post_receive(size_t i) {
    MsgBuffer& b = recv_buffers_[i];
    ssize_t rc;
    do {
      rc = fi_recv(ep_, b.data, kMaxMessageBytes, msg_desc_, FI_ADDR_UNSPEC, b.context);
      if (rc == -FI_EAGAIN) fi_cq_read(cq_, nullptr, 0);  // drive progress, then retry
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

  size_t decode(const fi_cq_data_entry& e, fi_addr_t source, Event* ev) {
    if (e.flags & FI_REMOTE_CQ_DATA) {
      // Match on FI_REMOTE_CQ_DATA alone: rxm leaves FI_RMA out of these flags.
      ev->kind = Event::Kind::RemoteData;
      ev->imm = static_cast<uint32_t>(e.data);
      ev->source = source == FI_ADDR_NOTAVAIL ? kUnknownPeer : source;
      return 1;
    }
    const size_t ri = recv_index(e.op_context);
    if (ri != SIZE_MAX) {
      consumed_.push_back(ri);
      ev->kind = Event::Kind::Message;
      ev->msg = recv_buffers_[ri].data;
      ev->msg_len = e.len;
      ev->source = source == FI_ADDR_NOTAVAIL ? kUnknownPeer : source;
      return 1;
    }
    if (is_send_buffer(e.op_context)) return 0;  // a control message left; nothing to report
    ev->kind = (e.flags & FI_SEND) ? Event::Kind::SendDone : Event::Kind::WriteDone;
    ev->context = e.op_context;
    return 1;
  }

  size_t read_error(Event* ev) {
    fi_cq_err_entry err{};
    ssize_t rc = fi_cq_readerr(cq_, &err, 0);
    if (rc < 0) return 0;
    const size_t ri = recv_index(err.op_context);
    if (ri != SIZE_MAX) {  // a receive failed (peer gone mid-message): repost it and go on
      consumed_.push_back(ri);
      return 0;
    }
    if (is_send_buffer(err.op_context)) return 0;
    ev->kind = Event::Kind::OpError;
    ev->context = err.op_context;
    char buf[256];
    const char* prov_err = fi_cq_strerror(cq_, err.prov_errno, err.err_data, buf, sizeof(buf));
    ev->error = std::string("write failed on provider ") + caps_.provider + ": " + fi_strerror(err.err) +
                " (err=" + std::to_string(err.err) + ", provider: " + (prov_err ? prov_err : "?") + ")";
    return 1;
  }

  fi_info* info_;
  Capabilities caps_;
  bool mr_local_ = false, prov_key_ = false;
  size_t inject_size_ = 0;
  fid_fabric* fabric_ = nullptr;
  fid_domain* domain_ = nullptr;
  fid_cq* cq_ = nullptr;
  fid_av* av_ = nullptr;
  fid_ep* ep_ = nullptr;
  fid_mr* msg_mr_ = nullptr;
  void* msg_desc_ = nullptr;
  MemoryKey send_mr_key_;
  std::vector<MsgBuffer> recv_buffers_, send_buffers_;
  std::vector<size_t> consumed_;
  size_t next_send_ = 0;
};

}  // namespace

std::unique_ptr<Transport> make_fabric_transport(const std::string& provider) {
  // provider may carry an interface: "tcp@lo".
  std::string name = provider, interface;
  if (auto at = provider.find('@'); at != std::string::npos) {
    name = provider.substr(0, at);
    interface = provider.substr(at + 1);
  }
  std::string reasons;
  for (const auto& p : provider_order()) {
    if (name.empty() ? std::string(p.kvxfer_name) == "shm" : name != p.kvxfer_name) continue;
    std::string why;
    if (fi_info* info = get_provider_info(p.kvxfer_name, interface, &why))
      return std::make_unique<FabricTransport>(info, p.kvxfer_name);
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
    out.push_back({p.kvxfer_name, info != nullptr, info ? std::string(info->fabric_attr->prov_name) : why});
    if (info) fi_freeinfo(info);
  }
  return out;
}

std::string fabric_version() {
  const uint32_t v = fi_version();
  return std::to_string(FI_MAJOR(v)) + "." + std::to_string(FI_MINOR(v));
}

}  // namespace kvxfer
