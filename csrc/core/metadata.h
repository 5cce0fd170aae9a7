// AgentInfo and its wire format. Peers exchange these bytes over the engine's own channel; nothing here is ever
// unpickled or trusted: the reader checks magic, version, total length, checksum, every count against a limit and
// every read against the end of the buffer, then validates each pool's layout against its regions.
//
// Layout (little-endian):  "KVXF" | u16 version | u16 flags | u32 payload_len | u32 fnv1a32(payload) | payload
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/layout.h"
#include "core/peer_key.h"
#include "gpu/vmm.h"

namespace kvxfer {

constexpr uint16_t kMetadataVersion = 10;  // 2: regions carry device and CUDA IPC handle; 3: signal pad; 4: doorbell;
                                           // 5: landing slots; 6: layouts carry their KV head range and order;
                                           // 7: transport keys (UCX's packed rkeys); 8: heartbeat interval;
                                           // 9: per-peer keys; 10: per-peer keys differ per association (same
                                           // bytes as 9, keys derived anew: peer_key.h)

struct RemoteRegion {
  uint64_t addr = 0;    // virtual address in the owner's process
  uint64_t nbytes = 0;
  uint64_t rkey = 0;    // fabric remote key (0 when not registered with a fabric)
  int32_t device = -1;  // -1 host memory; >= 0 the owner's CUDA device ordinal
  std::string pci_bus_id{};         // device regions: the GPU's PCI bus id (ordinals differ between processes)
  bool has_ipc = false;             // device regions: a CUDA IPC handle is exported
  std::vector<uint8_t> ipc_handle{};  // [64] cudaIpcMemHandle_t of the allocation holding the region
  uint64_t ipc_offset = 0;          // region start - allocation start (VMM: - the first piece's start)
  bool has_vmm = false;             // device regions: cuMem/VMM memory shared piece by piece (gpu/vmm.h)
  std::vector<gpu::VmmPiece> vmm_pieces{};
  bool fabric_registered() const { return device < 0 || rkey != 0; }
};

struct PoolInfo {
  std::string name;
  LayoutSpec layout;
  std::vector<RemoteRegion> regions;
  // Senders cannot write this pool directly (GPU memory the fabric cannot register, or landing='always'): they
  // write into the owner's landing slots, which copies into the pool (transports/staged/landing.h).
  bool landing = false;
  // Senders may write it directly or through the owner's landing slots: offered for host pools of small chunks on a
  // software fabric (tcp), where one write per chunk costs more than two memcpys (benchmarks/RESULTS.md).
  bool landing_offered = false;
};

struct AgentInfo {
  std::string name;
  uint64_t epoch = 0;            // random per Agent incarnation: a restarted peer is a new epoch
  uint32_t pid = 0;
  std::string hostname;
  std::string boot_id;           // /proc/sys/kernel/random/boot_id: same host <=> same boot id
  std::string transport;         // kvxfer transport name of the fabric endpoint ("tcp", "fi_shm", "efa", ...)
  std::vector<uint8_t> fabric_address;
  bool remote_virt_addr = false; // writes address the owner's virtual addresses (else region offsets)
  uint64_t cma_probe_addr = 0;   // address of an 8-byte cookie a same-host peer reads to prove CMA works
  uint64_t cma_probe_cookie = 0;
  // A small host buffer registered with the fabric that zero-byte signal writes (CMA and CUDA IPC completions)
  // address: the destination pool itself may be GPU memory the fabric never registered.
  uint64_t signal_addr = 0;
  uint64_t signal_rkey = 0;
  // Same-host doorbell (transports/host_ipc/doorbell.h): fd numbers in the owner's process, -1 when it has none.
  int32_t doorbell_fd = -1;
  int32_t wake_fd = -1;
  // Landing ring (transports/staged/landing.h): max_peers x landing_slots slots of landing_slot_bytes,
  // registered under landing_rkey; landing_slots == 0 when no pool needs it.
  uint64_t landing_addr = 0;
  uint64_t landing_rkey = 0;
  uint32_t landing_slots = 0;
  uint64_t landing_slot_bytes = 0;
  // Remote keys that do not fit the 64-bit rkey fields (Transport::exported_keys: UCX's packed rkeys, keyed by the
  // 64-bit values those fields carry); empty for libfabric.
  std::vector<uint8_t> transport_keys;
  // How often this agent sends each connected peer a PING (0: never; peers then cannot tell it went silent).
  uint32_t heartbeat_ms = 0;
  // Every key above (regions, signal pad, landing ring) is a base: a peer writes with peer_key(base, writer_salt(its
  // epoch, our link for it)), registered for it alone (Transport::register_peer_key), so closing them fences it out.
  bool peer_keys = false;
  std::vector<PoolInfo> pools;

  // Hash over every pool's layout fingerprint: a quick "same model shard" check for engines.
  uint64_t fingerprint() const;
};

// Text that travels in metadata (names, host, dtype...) ends up in Python strings and error messages: well-formed
// UTF-8 (what Python's strict decoder accepts: no overlong forms, surrogates or values past U+10FFFF) without ASCII
// control characters.
bool printable_text(const std::string& s);
// s in double quotes, its ASCII control characters written \xNN: for errors about text that is not printable.
std::string quoted_text(const std::string& s);

std::vector<uint8_t> encode_agent_info(const AgentInfo& info);
// Throws MetadataError naming what is wrong (truncated at offset N, bad magic, version V unsupported, ...).
AgentInfo decode_agent_info(const uint8_t* data, size_t nbytes);

}  // namespace kvxfer
