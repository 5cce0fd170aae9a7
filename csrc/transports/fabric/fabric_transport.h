// FabricTransport: libfabric RDM endpoints ("rails") with FI_RMA writes carrying remote CQ data, plus FI_MSG control
// messages on rail 0. Each rail has its own CQ (FI_CQ_FORMAT_DATA, bound for transmit and receive) and AV; rails
// share one domain, so one registration and one remote key serve all of them. Remote CQ data entries are matched by
// flags & FI_REMOTE_CQ_DATA only (rxm omits FI_RMA; see shared/research/libfabric-imm.md).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "transports/transport.h"

namespace kvxfer {

// provider: "tcp", "shm", "efa", "verbs", or "" for the best available (efa > verbs > tcp); rails: endpoints to
// spread writes over (1-16).
std::unique_ptr<Transport> make_fabric_transport(const std::string& provider, uint32_t rails = 1);

// Which providers this machine can open right now, with the reason for those it cannot.
struct ProviderProbe {
  std::string name;
  bool usable;
  std::string detail;  // the provider string when usable, the reason otherwise
  bool own_keys = false;  // usable, and peers would write with keys of their own (Capabilities::fences_peers)
  bool coalesced_imms = false;  // usable, and one immediate would count the writes before it (ordered_writes)
  std::vector<std::string> domains;  // usable: the domains Agent(interface=...) may name ("eth0", "lo", "mlx5_0")
};
std::vector<ProviderProbe> probe_fabric_providers();

// Per-peer keys against the provider itself (fence_probe.cpp): which of four 64-byte writes landed (own key; the
// shared key; own key after it was closed; a new peer's key after that), the bytes changed and the immediates the
// target saw. Only fences_peers is set where the provider has no per-peer keys.
struct FenceProbe {
  bool fences_peers = false;
  bool own_key_landed = false, shared_key_landed = false, closed_key_landed = false, new_key_landed = false;
  size_t bytes_written = 0;
  std::vector<uint32_t> immediates;
};
FenceProbe probe_peer_fence(const std::string& provider);  // "tcp@lo", "shm"

std::string fabric_version();

}  // namespace kvxfer
