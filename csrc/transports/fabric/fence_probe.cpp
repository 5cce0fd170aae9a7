// probe_peer_fence: what per-peer keys promise, checked against the provider itself (tests/test_peer_keys.py). Two
// transports of one process stand for a writer and its target: a write under the writer's own key lands, one under
// the target's shared key does not, nor one under the writer's key after the target closed it. Each write carries
// its offset as immediate data, so the probe also reports which writes the target was told about.
#include <chrono>
#include <cstring>
#include <vector>

#include "core/metadata.h"
#include "transports/fabric/fabric_transport.h"

namespace kvxfer {

namespace {

constexpr size_t kBytes = 4096, kWrite = 64;
constexpr uint8_t kPattern = 0x5a;
using Clock = std::chrono::steady_clock;

struct Pair {
  std::unique_ptr<Transport> writer, target;
  PeerAddr target_at_writer = kUnknownPeer;
  std::vector<uint32_t> imms;  // immediates the target saw

  bool poll_both(const void* ctx) {  // true once the writer completed the op posted with ctx (well or not)
    Event ev[16];
    bool done = false;
    size_t n = writer->poll(ev, 16);
    for (size_t i = 0; i < n; ++i) done |= ev[i].context == ctx;
    n = target->poll(ev, 16);
    for (size_t i = 0; i < n; ++i)
      if (ev[i].kind == Event::Kind::RemoteData) imms.push_back(ev[i].imm);
    return done;
  }

  // One write of kWrite bytes to `offset` under `key`: posted, completed at the writer, then 200 ms more of the
  // target's progress, which applies it or refuses it.
  void write(const MemoryKey& src_key, const uint8_t* src, uint8_t* dst, uint32_t offset, uint64_t key) {
    alignas(16) uint8_t ctx[Transport::kContextBytes] = {};
    const uint64_t remote = (target->capabilities().remote_virt_addr ? reinterpret_cast<uint64_t>(dst) : 0) + offset;
    const auto give_up = Clock::now() + std::chrono::seconds(10);
    while (writer->post_write(src, kWrite, src_key.desc, offset, target_at_writer, remote, key, ctx) == -EAGAIN) {
      poll_both(ctx);
      KVXFER_CHECK(Clock::now() < give_up, TransferTimeout, "fence probe: the write was not accepted in 10 s");
    }
    while (!poll_both(ctx))
      KVXFER_CHECK(Clock::now() < give_up, TransferTimeout, "fence probe: the write did not complete in 10 s");
    for (const auto until = Clock::now() + std::chrono::milliseconds(200); Clock::now() < until;) poll_both(nullptr);
  }
};

bool landed(const std::vector<uint8_t>& dst, uint32_t offset) {
  for (size_t i = 0; i < kWrite; ++i)
    if (dst[offset + i] != kPattern) return false;
  return true;
}

}  // namespace

FenceProbe probe_peer_fence(const std::string& provider) {
  Pair p{make_fabric_transport(provider), make_fabric_transport(provider), kUnknownPeer, {}};
  FenceProbe out;
  out.fences_peers = p.target->capabilities().fences_peers;
  if (!out.fences_peers) return out;
  std::vector<uint8_t> src(kBytes, kPattern), dst(kBytes, 0);
  MemoryKey src_key = p.writer->register_memory(src.data(), kBytes, 0x51);
  MemoryKey shared = p.target->register_memory(dst.data(), kBytes, 0xB0);
  p.target_at_writer = p.writer->insert_peer(p.target->address());
  p.target->insert_peer(p.writer->address());  // the target names the source of what arrives (FI_SOURCE)
  const uint64_t writer_epoch = 42;
  MemoryKey own = p.target->register_peer_key(dst.data(), kBytes, peer_key(shared.rkey, writer_epoch));
  p.write(src_key, src.data(), dst.data(), 0, own.rkey);
  p.write(src_key, src.data(), dst.data(), 1024, shared.rkey);
  p.target->deregister_memory(own);
  p.write(src_key, src.data(), dst.data(), 2048, peer_key(shared.rkey, writer_epoch));
  MemoryKey next = p.target->register_peer_key(dst.data(), kBytes, peer_key(shared.rkey, writer_epoch + 1));
  p.write(src_key, src.data(), dst.data(), 3072, next.rkey);
  out.own_key_landed = landed(dst, 0);
  out.shared_key_landed = landed(dst, 1024);
  out.closed_key_landed = landed(dst, 2048);
  out.new_key_landed = landed(dst, 3072);
  size_t touched = 0;
  for (uint8_t b : dst) touched += b != 0;
  out.bytes_written = touched;
  out.immediates = p.imms;
  p.writer->shutdown();
  p.target->shutdown();
  p.target->deregister_memory(next);
  p.target->deregister_memory(shared);
  p.writer->deregister_memory(src_key);
  return out;
}

}  // namespace kvxfer
