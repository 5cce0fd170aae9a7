#include "core/metadata.h"

#include <cstring>

#include "core/errors.h"
#include "transports/staged/landing.h"

namespace kvxfer {
namespace {

constexpr char kMagic[4] = {'K', 'V', 'X', 'F'};
constexpr size_t kHeaderBytes = 16;
constexpr uint32_t kMaxString = 4096, kMaxPools = 64, kMaxRegions = 4096, kMaxAddress = 4096;
constexpr uint32_t kMaxTransportKeys = 4u << 20;  // UCX: packed rkeys of every region, tens to hundreds of bytes each
constexpr uint32_t kMaxPayload = 64u << 20;
constexpr uint32_t kIpcHandleBytes = 64;  // cudaIpcMemHandle_t
// A pool's landing byte. Readers before 2026-12-01 take any non-zero value as required: they still reach an offered
// pool, through its landing slots.
constexpr uint8_t kPoolLandingRequired = 1, kPoolLandingOffered = 2;

uint32_t fnv1a32(const uint8_t* p, size_t n) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 16777619u;
  return h;
}

class Writer {
 public:
  template <typename T>
  void put(T v) {
    const size_t at = buf.size();
    buf.resize(at + sizeof(T));
    std::memcpy(buf.data() + at, &v, sizeof(T));
  }
  void bytes(const void* p, size_t n) {
    put<uint32_t>(static_cast<uint32_t>(n));
    const auto* b = static_cast<const uint8_t*>(p);
    buf.insert(buf.end(), b, b + n);
  }
  void str(const std::string& s) { bytes(s.data(), s.size()); }
  std::vector<uint8_t> buf;
};

class Reader {
 public:
  Reader(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  template <typename T>
  T get(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, p_ + at_, sizeof(T));
    at_ += sizeof(T);
    return v;
  }
  uint32_t count(const char* what, uint32_t limit) {
    const uint32_t n = get<uint32_t>(what);
    KVXFER_CHECK(n <= limit, MetadataError,
                 "peer metadata: " << what << " count " << n << " exceeds the limit " << limit
                                   << " (corrupt bytes or an incompatible kvxfer)");
    return n;
  }
  std::vector<uint8_t> bytes(const char* what, uint32_t limit) {
    const uint32_t n = count(what, limit);
    need(n, what);
    std::vector<uint8_t> out(p_ + at_, p_ + at_ + n);
    at_ += n;
    return out;
  }
  std::string str(const char* what) {
    auto b = bytes(what, kMaxString);
    std::string s(b.begin(), b.end());
    KVXFER_CHECK(printable_text(s), MetadataError,
                 "peer metadata: the " << what << " is not printable UTF-8 text (corrupt bytes or an incompatible "
                                          "kvxfer)");
    return s;
  }
  bool done() const { return at_ == n_; }
  size_t offset() const { return at_; }

 private:
  void need(size_t k, const char* what) {
    KVXFER_CHECK(k <= n_ - at_, MetadataError,
                 "peer metadata truncated: reading " << what << " needs " << k << " bytes at offset " << at_
                                                     << " of " << n_ << "; pass the exact bytes agent.metadata() returned");
  }
  const uint8_t* p_;
  size_t n_, at_ = 0;
};

void write_layout(Writer& w, const LayoutSpec& l) {
  w.str(l.kind);
  for (uint32_t v : {l.num_layers, l.num_blocks, l.num_planes, l.block_size, l.num_kv_heads, l.head_dim}) w.put(v);
  w.str(l.dtype);
  for (uint64_t v : {l.chunk_bytes, l.plane_stride, l.block_stride}) w.put(v);
  for (uint32_t v : {l.head_begin, l.total_kv_heads, uint32_t(l.head_major)}) w.put(v);
  for (uint32_t i = 0; i < l.num_layers; ++i) {
    w.put(l.layer_region[i]);
    w.put(l.layer_offset[i]);
  }
}

LayoutSpec read_layout(Reader& r) {
  LayoutSpec l;
  l.kind = r.str("layout kind");
  l.num_layers = r.get<uint32_t>("num_layers");
  KVXFER_CHECK(l.num_layers <= 256, MetadataError, "peer metadata: num_layers " << l.num_layers << " > 256");
  l.num_blocks = r.get<uint32_t>("num_blocks");
  l.num_planes = r.get<uint32_t>("num_planes");
  l.block_size = r.get<uint32_t>("block_size");
  l.num_kv_heads = r.get<uint32_t>("num_kv_heads");
  l.head_dim = r.get<uint32_t>("head_dim");
  l.dtype = r.str("dtype");
  l.chunk_bytes = r.get<uint64_t>("chunk_bytes");
  l.plane_stride = r.get<uint64_t>("plane_stride");
  l.block_stride = r.get<uint64_t>("block_stride");
  l.head_begin = r.get<uint32_t>("head_begin");
  l.total_kv_heads = r.get<uint32_t>("total_kv_heads");
  const uint32_t head_major = r.get<uint32_t>("head_major");
  KVXFER_CHECK(head_major <= 1, MetadataError, "peer metadata: head_major " << head_major << " is not 0 or 1");
  l.head_major = head_major != 0;
  for (uint32_t i = 0; i < l.num_layers; ++i) {
    l.layer_region.push_back(r.get<uint32_t>("layer region"));
    l.layer_offset.push_back(r.get<uint64_t>("layer offset"));
  }
  return l;
}

}  // namespace

bool printable_text(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      if (c < 0x20 || c == 0x7F) return false;
      ++i;
      continue;
    }
    size_t more;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) {
      more = 1, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      more = 2, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      more = 3, cp = c & 0x07;
    } else {
      return false;  // a continuation byte first, or 0xF8..0xFF
    }
    if (s.size() - i <= more) return false;
    for (size_t k = 1; k <= more; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      if ((b & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (b & 0x3F);
    }
    static constexpr uint32_t kLeast[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kLeast[more] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += more + 1;
  }
  return true;
}

std::string quoted_text(const std::string& s) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "\"";
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c == 0x7F) out += std::string("\\x") + kHex[c >> 4] + kHex[c & 15];
    else out += ch;
  }
  return out + "\"";
}

uint64_t AgentInfo::fingerprint() const {
  uint64_t h = 0xcbf29ce484222325ull;
  for (const auto& p : pools) h = (h ^ p.layout.fingerprint()) * 0x100000001b3ull;
  return h;
}

std::vector<uint8_t> encode_agent_info(const AgentInfo& a) {
  Writer w;
  w.str(a.name);
  w.put(a.epoch);
  w.put(a.pid);
  w.str(a.hostname);
  w.str(a.boot_id);
  w.str(a.transport);
  w.bytes(a.fabric_address.data(), a.fabric_address.size());
  w.put<uint8_t>(a.remote_virt_addr ? 1 : 0);
  w.put(a.cma_probe_addr);
  w.put(a.cma_probe_cookie);
  w.put(a.signal_addr);
  w.put(a.signal_rkey);
  w.put(a.doorbell_fd);
  w.put(a.wake_fd);
  w.put(a.landing_addr);
  w.put(a.landing_rkey);
  w.put(a.landing_slots);
  w.put(a.landing_slot_bytes);
  w.bytes(a.transport_keys.data(), a.transport_keys.size());
  w.put(a.heartbeat_ms);
  w.put<uint8_t>(a.peer_keys ? 1 : 0);
  w.put<uint32_t>(static_cast<uint32_t>(a.pools.size()));
  for (const auto& p : a.pools) {
    w.str(p.name);
    write_layout(w, p.layout);
    w.put<uint8_t>(p.landing ? kPoolLandingRequired : p.landing_offered ? kPoolLandingOffered : 0);
    w.put<uint32_t>(static_cast<uint32_t>(p.regions.size()));
    for (const auto& r : p.regions) {
      w.put(r.addr);
      w.put(r.nbytes);
      w.put(r.rkey);
      w.put(r.device);
      if (r.device >= 0) {
        w.str(r.pci_bus_id);
        w.put<uint8_t>(r.has_ipc ? 1 : 0);
        if (r.has_ipc) w.bytes(r.ipc_handle.data(), r.ipc_handle.size());
        w.put(r.ipc_offset);
        w.put<uint8_t>(r.has_vmm ? 1 : 0);
        if (r.has_vmm) {
          w.put<uint32_t>(static_cast<uint32_t>(r.vmm_pieces.size()));
          for (const auto& p : r.vmm_pieces) {
            w.put(p.start);
            w.put(p.size);
            w.put(p.fd);
            w.bytes(p.fabric.data(), p.fabric.size());
          }
        }
      }
    }
  }
  w.put(a.fingerprint());

  std::vector<uint8_t> out(kHeaderBytes);
  std::memcpy(out.data(), kMagic, 4);
  const uint16_t version = kMetadataVersion, flags = 0;
  const uint32_t len = static_cast<uint32_t>(w.buf.size()), sum = fnv1a32(w.buf.data(), w.buf.size());
  std::memcpy(out.data() + 4, &version, 2);
  std::memcpy(out.data() + 6, &flags, 2);
  std::memcpy(out.data() + 8, &len, 4);
  std::memcpy(out.data() + 12, &sum, 4);
  out.insert(out.end(), w.buf.begin(), w.buf.end());
  return out;
}

AgentInfo decode_agent_info(const uint8_t* data, size_t nbytes) {
  KVXFER_CHECK(nbytes >= kHeaderBytes, MetadataError,
               "peer metadata is " << nbytes << " bytes, shorter than the " << kHeaderBytes
                                   << "-byte header; pass the exact bytes agent.metadata() returned");
  KVXFER_CHECK(std::memcmp(data, kMagic, 4) == 0, MetadataError,
               "peer metadata does not start with the kvxfer magic 'KVXF'; these bytes are not kvxfer metadata");
  uint16_t version;
  uint32_t len, sum;
  std::memcpy(&version, data + 4, 2);
  std::memcpy(&len, data + 8, 4);
  std::memcpy(&sum, data + 12, 4);
  KVXFER_CHECK(version == kMetadataVersion, MetadataError,
               "peer metadata version " << version << " is not supported (this kvxfer speaks version "
                                        << kMetadataVersion << "); run the same kvxfer release on both sides");
  KVXFER_CHECK(len <= kMaxPayload && len == nbytes - kHeaderBytes, MetadataError,
               "peer metadata length mismatch: header says " << len << " payload bytes, got "
                                                             << nbytes - kHeaderBytes << " (truncated or padded)");
  KVXFER_CHECK(fnv1a32(data + kHeaderBytes, len) == sum, MetadataError,
               "peer metadata checksum mismatch: the bytes were corrupted in transit");

  Reader r(data + kHeaderBytes, len);
  AgentInfo a;
  a.name = r.str("agent name");
  a.epoch = r.get<uint64_t>("epoch");
  a.pid = r.get<uint32_t>("pid");
  a.hostname = r.str("hostname");
  a.boot_id = r.str("boot id");
  a.transport = r.str("transport");
  a.fabric_address = r.bytes("fabric address", kMaxAddress);
  a.remote_virt_addr = r.get<uint8_t>("address mode") != 0;
  a.cma_probe_addr = r.get<uint64_t>("cma probe address");
  a.cma_probe_cookie = r.get<uint64_t>("cma probe cookie");
  a.signal_addr = r.get<uint64_t>("signal pad address");
  a.signal_rkey = r.get<uint64_t>("signal pad key");
  a.doorbell_fd = r.get<int32_t>("doorbell fd");
  a.wake_fd = r.get<int32_t>("wake fd");
  KVXFER_CHECK(a.doorbell_fd >= -1 && a.wake_fd >= -1, MetadataError,
               "peer metadata: doorbell fd " << a.doorbell_fd << " / wake fd " << a.wake_fd << " out of range");
  a.landing_addr = r.get<uint64_t>("landing address");
  a.landing_rkey = r.get<uint64_t>("landing key");
  a.landing_slots = r.get<uint32_t>("landing slots");
  a.landing_slot_bytes = r.get<uint64_t>("landing slot bytes");
  a.transport_keys = r.bytes("transport keys", kMaxTransportKeys);
  a.heartbeat_ms = r.get<uint32_t>("heartbeat interval");
  const uint8_t peer_keys = r.get<uint8_t>("key mode");
  KVXFER_CHECK(peer_keys <= 1, MetadataError, "peer metadata: key mode " << int{peer_keys} << " (0 shared, 1 per peer)");
  a.peer_keys = peer_keys == 1;
  KVXFER_CHECK(a.heartbeat_ms <= 3600u * 1000, MetadataError,
               "peer metadata: heartbeat every " << a.heartbeat_ms << " ms is out of range");
  KVXFER_CHECK(a.landing_slots <= kLandingMaxSlotsPerPeer &&
                   (a.landing_slots == 0 || (a.landing_slot_bytes >= kLandingDataOffset + 4096 &&
                                             a.landing_slot_bytes <= (1ull << 30))),
               MetadataError,
               "peer metadata: landing ring of " << a.landing_slots << " slots of " << a.landing_slot_bytes
                                                 << " bytes per peer is out of range");
  const uint32_t num_pools = r.count("pool", kMaxPools);
  for (uint32_t i = 0; i < num_pools; ++i) {
    PoolInfo p;
    p.name = r.str("pool name");
    p.layout = read_layout(r);
    const uint8_t landing = r.get<uint8_t>("pool landing flag");
    KVXFER_CHECK(landing <= kPoolLandingOffered, MetadataError,
                 "peer metadata: pool '" << p.name << "' has landing mode " << int{landing}
                                         << " (0 none, 1 required, 2 offered); is the peer a newer kvxfer?");
    p.landing = landing == kPoolLandingRequired;
    p.landing_offered = landing == kPoolLandingOffered;
    KVXFER_CHECK((!p.landing && !p.landing_offered) || a.landing_slots > 0, MetadataError,
                 "peer metadata: pool '" << p.name << "' is reached through landing slots but the peer has none");
    const uint32_t num_regions = r.count("region", kMaxRegions);
    std::vector<uint64_t> sizes;
    for (uint32_t k = 0; k < num_regions; ++k) {
      RemoteRegion reg;
      reg.addr = r.get<uint64_t>("region address");
      reg.nbytes = r.get<uint64_t>("region size");
      reg.rkey = r.get<uint64_t>("region key");
      KVXFER_CHECK(reg.addr + reg.nbytes >= reg.addr, MetadataError, "peer metadata: region " << k << " wraps around");
      reg.device = r.get<int32_t>("region device");
      KVXFER_CHECK(reg.device >= -1 && reg.device < 1024, MetadataError,
                   "peer metadata: region " << k << " names device " << reg.device);
      if (reg.device >= 0) {
        reg.pci_bus_id = r.str("region PCI bus id");
        reg.has_ipc = r.get<uint8_t>("region IPC flag") != 0;
        if (reg.has_ipc) {
          reg.ipc_handle = r.bytes("region IPC handle", kIpcHandleBytes);
          KVXFER_CHECK(reg.ipc_handle.size() == kIpcHandleBytes, MetadataError,
                       "peer metadata: region " << k << " IPC handle is " << reg.ipc_handle.size() << " bytes, not "
                                                << kIpcHandleBytes);
        }
        reg.ipc_offset = r.get<uint64_t>("region IPC offset");
        reg.has_vmm = r.get<uint8_t>("region VMM flag") != 0;
        if (reg.has_vmm) {
          const uint32_t n = r.count("region VMM piece", gpu::kMaxVmmPieces);
          KVXFER_CHECK(n > 0, MetadataError, "peer metadata: region " << k << " is VMM memory with no pieces");
          uint64_t covered = 0;
          for (uint32_t i = 0; i < n; ++i) {
            gpu::VmmPiece p;
            p.start = r.get<uint64_t>("VMM piece start");
            p.size = r.get<uint64_t>("VMM piece size");
            p.fd = r.get<int32_t>("VMM piece fd");
            p.fabric = r.bytes("VMM fabric handle", gpu::kFabricHandleBytes);
            KVXFER_CHECK(p.size > 0 && (p.fd >= 0) != !p.fabric.empty() &&
                             (p.fabric.empty() || p.fabric.size() == gpu::kFabricHandleBytes) &&
                             (i == 0 || p.start == reg.vmm_pieces.back().start + reg.vmm_pieces.back().size),
                         MetadataError,
                         "peer metadata: region " << k << " VMM piece " << i
                                                  << " is malformed (empty, no handle, or not contiguous)");
            covered += p.size;
            reg.vmm_pieces.push_back(std::move(p));
          }
          KVXFER_CHECK(reg.ipc_offset <= covered && reg.nbytes <= covered - reg.ipc_offset, MetadataError,
                       "peer metadata: region " << k << " does not lie inside its VMM pieces");
        }
      }
      sizes.push_back(reg.nbytes);
      p.regions.push_back(reg);
    }
    try {
      validate_layout(p.layout, sizes);
    } catch (const Error& e) {
      KVXFER_THROW(MetadataError, "peer metadata: pool '" << p.name << "' is inconsistent: " << e.what());
    }
    a.pools.push_back(std::move(p));
  }
  const uint64_t fp = r.get<uint64_t>("fingerprint");
  KVXFER_CHECK(fp == a.fingerprint(), MetadataError, "peer metadata: fingerprint does not match its pools");
  KVXFER_CHECK(r.done(), MetadataError, "peer metadata has " << len - r.offset() << " unexpected trailing bytes");
  return a;
}

}  // namespace kvxfer
