// Transport: what the Agent needs from a wire. FabricTransport (libfabric: efa, verbs, tcp, shm) and UcxTransport
// (UCX's UCP: whatever wires UCX picks) implement it.
// The same-host CMA path (host_ipc/) moves bytes itself and signals through its doorbell rings, or this interface's
// zero-byte writes where a peer's rings cannot be mapped.
//
// Threading: the constructor, address(), register_memory()/register_peer_key()/deregister_memory(), exported_keys(),
// insert_peer(), import_keys() and describe_peer() run on caller threads (register_pool, metadata, add_peer), beside
// the progress thread (the agent serializes them with its transport mutex); every other method runs on the Agent's
// progress thread only.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/errors.h"

namespace kvxfer {

// A two-way KVXFER_* switch: true for `first` (also when unset), false for `second`, anything else refused by name: a
// typo that silently kept the default would make an A/B comparison measure nothing.
inline bool env_is_first(const char* name, const char* first, const char* second) {
  const char* v = std::getenv(name);
  if (!v || !*v || std::strcmp(v, first) == 0) return true;
  if (std::strcmp(v, second) == 0) return false;
  KVXFER_THROW(InvalidArgument,
               name << "='" << v << "' is not one of " << first << ", " << second << "; unset it or fix it");
}

// KVXFER_IDLE_WAIT: "fd" (default) lets an idle progress thread block on the transport's wait fds, "poll" keeps it
// polling.
inline bool idle_wait_fd_wanted() { return env_is_first("KVXFER_IDLE_WAIT", "fd", "poll"); }

// KVXFER_PEER_KEYS: "own" (default) gives each peer keys of its own where the transport can (fences_peers), "shared"
// one key for all.
inline bool own_peer_keys_wanted() { return env_is_first("KVXFER_PEER_KEYS", "own", "shared"); }

// KVXFER_IMM: "coalesced" (default) lets one immediate count every write before it on an ordered rail
// (Capabilities::ordered_writes), "each" puts one on every write (for measuring what coalescing saves).
inline bool coalesced_imms_wanted() { return env_is_first("KVXFER_IMM", "coalesced", "each"); }

using PeerAddr = uint64_t;  // transport-local handle of a peer (fi_addr_t for libfabric)
constexpr PeerAddr kUnknownPeer = ~0ull;

struct MemoryKey {
  void* handle = nullptr;   // transport-owned registration (fid_mr*)
  void* desc = nullptr;     // local descriptor to pass with writes from this memory (FI_MR_LOCAL)
  uint64_t rkey = 0;        // remote key the peer puts in its writes
};

struct Capabilities {
  std::string provider;       // "tcp;ofi_rxm", "shm", "efa", "verbs;ofi_rxm", ...
  std::string name;           // kvxfer's transport name: "tcp", "fi_shm", "efa", "verbs"
  std::string domain;         // the NIC or interface it opened: libfabric's domain name ("eth0", "mlx5_0",
                              // "rdmap16s27-rdm", "shm"); "" for ucx (Peer.path_reason names its lanes)
  bool remote_virt_addr;      // remote addresses are virtual addresses (FI_MR_VIRT_ADDR), else MR offsets
  uint64_t max_write_bytes;   // largest single write we post
  size_t max_inflight;        // bounded in-flight window (<= provider tx size)
  size_t max_iov = 1;         // chunks one write may gather (min of the provider's iov and rma_iov limits)
  uint32_t num_rails = 1;     // endpoints writes can be spread over (control messages use rail 0)
  bool hmem = false;          // can register CUDA memory (FI_HMEM): GPU-direct RDMA, no staging needed
  bool releases_peers = true; // remove_peer closes the peer's connection
  // UCX: closing an endpoint still in its connection handshake aborts UCX 1.13, so only a peer that finished
  // connecting (kvxfer's HELLOs both ways) is released; the transport itself keeps one it cannot close safely.
  bool releases_connected_peers_only = false;
  // Peers write with keys of their own (register_peer_key): our registrations grant no remote access, and closing a
  // peer's keys refuses whatever it still writes, however late it arrives or reconnects. libfabric with keys we
  // choose (tcp, shm), and UCX where every write is a data AM (it checks their keys itself); providers that choose
  // keys themselves (efa, verbs) and UCX with puts share one key among all peers.
  bool fences_peers = false;
  // On each rail, a write's immediate is reported to the peer only after the data of every write posted before it
  // on that rail landed (the provider orders writes: FI_ORDER_RMA_WAW with no size limit). One zero-byte write with
  // immediate may then count every write before it (post_plain_writev), as with RC's "imm on the last write".
  bool ordered_writes = false;
};

struct RailStats {
  uint64_t writes = 0;  // writes posted on this rail
  uint64_t imms = 0;    // remote CQ data entries that arrived on this rail
};

// One piece of a gathered write: local source and remote destination of the same length.
struct WriteIov {
  const void* src;
  size_t nbytes;
  void* desc;
  uint64_t remote_addr;
  uint64_t rkey;
};

// One completion-queue event, decoded.
struct Event {
  enum class Kind { WriteDone, SendDone, Message, RemoteData, OpError } kind;
  void* context = nullptr;     // the op context the write/send was posted with
  PeerAddr source = kUnknownPeer;  // for Message / RemoteData
  uint32_t imm = 0;            // for RemoteData
  const uint8_t* msg = nullptr;    // for Message: valid until the next poll()
  size_t msg_len = 0;
  std::string error;           // for OpError: call, rc, fi_strerror, provider
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual const Capabilities& capabilities() const = 0;
  virtual std::vector<uint8_t> address() const = 0;
  // device < 0: host memory; >= 0: CUDA memory of that device (only when capabilities().hmem).
  virtual MemoryKey register_memory(void* addr, size_t nbytes, uint64_t requested_key, int device = -1) = 0;
  virtual void deregister_memory(MemoryKey& key) = 0;
  // Remote write access to host memory already registered, for one peer under `key` (capabilities().fences_peers;
  // Agent::open_peer_keys); closed with deregister_memory.
  virtual MemoryKey register_peer_key(void* addr, size_t nbytes, uint64_t key) {
    KVXFER_THROW(InvalidArgument, "this transport has no per-peer keys (capabilities().fences_peers is false)");
  }
  virtual PeerAddr insert_peer(const std::vector<uint8_t>& address) = 0;
  virtual void remove_peer(PeerAddr peer) = 0;
  // Rails usable towards this peer: min(ours, the peer's). Rail r of ours writes to rail r of the peer.
  virtual uint32_t peer_rails(PeerAddr peer) const = 0;
  // Return 0 when posted, or -EAGAIN (the caller polls and retries). Other failures throw TransferFailed.
  // context must point to storage that begins with kContextBytes the transport may use until the completion.
  virtual int post_write(const void* src, size_t nbytes, void* desc, uint32_t imm, PeerAddr peer,
                         uint64_t remote_addr, uint64_t rkey, void* context, uint32_t rail = 0) = 0;
  // A gathered write: n pieces, one completion, one immediate (fi_writemsg with FI_REMOTE_CQ_DATA).
  virtual int post_writev(const WriteIov* iov, size_t n, uint32_t imm, PeerAddr peer, void* context,
                          uint32_t rail = 0) = 0;
  // A gathered write that carries no immediate: the peer learns of it from a later write's immediate on the same
  // rail (capabilities().ordered_writes). 0, -EAGAIN, or throws TransferFailed.
  virtual int post_plain_writev(const WriteIov* iov, size_t n, PeerAddr peer, void* context, uint32_t rail = 0) {
    KVXFER_THROW(InvalidArgument, "this transport does not order writes (capabilities().ordered_writes is false)");
  }
  virtual int post_message(const void* msg, size_t nbytes, PeerAddr peer, void* context, uint32_t rail = 0) = 0;
  // Fills up to max events from every rail; never blocks. RemoteData sources are insert_peer handles.
  virtual size_t poll(Event* events, size_t max) = 0;
  // Stops all traffic: closes the endpoints (and their queues) while the memory their pending operations point at
  // (op contexts, bounce buffers, pools) is still alive; registrations stay valid until deregistered. The agent
  // calls it once, after its progress thread stopped; nothing but deregister_memory() may follow.
  virtual void shutdown() = 0;
  // Safe to call from any thread (atomics).
  virtual std::vector<RailStats> rail_stats() const = 0;
  // File descriptors that become readable when poll() may have something (one per rail), or empty when the
  // provider has no wait object (the agent then sleeps in short steps instead of blocking).
  virtual std::vector<int> wait_fds() const { return {}; }
  // True when blocking on wait_fds() now cannot miss an event (fi_trywait); false: poll() again first.
  virtual bool ready_to_wait() { return false; }
  // Transports whose remote keys do not fit in 64 bits (UCX's packed rkeys) publish them here, keyed by the rkey
  // register_memory returned; the bytes travel in the agent's metadata and the peer hands them to import_keys.
  // Empty: the 64-bit keys are the whole story (libfabric).
  virtual std::vector<uint8_t> exported_keys() const { return {}; }
  // Throws MetadataError when the bytes are malformed. Called again with a newer blob when the peer re-sends its
  // metadata (more pools registered); keys already imported stay valid.
  virtual void import_keys(PeerAddr peer, const std::vector<uint8_t>& keys) {}
  // Where the peer gives each writer keys of its own (AgentInfo::peer_keys): we write with peer_key(published, salt)
  // from now on (the salt is known once the peer's HELLO named the association).
  virtual void set_write_salt(PeerAddr peer, uint64_t salt) {}
  // What carries bytes to this peer, for Peer.path_reason ("ucx lanes: tcp/lo (rma, am)"); empty when the
  // transport has nothing to add to its name.
  virtual std::string describe_peer(PeerAddr peer) const { return {}; }
  static constexpr size_t kContextBytes = 64;  // >= sizeof(struct fi_context2)
  static constexpr size_t kMaxMessageBytes = 256;
};

}  // namespace kvxfer
