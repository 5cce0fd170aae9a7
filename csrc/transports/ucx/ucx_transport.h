// UcxTransport: the Transport interface over UCX's UCP layer (one worker, one endpoint per peer). UCX picks the
// wires itself (rc/dc verbs, tcp, shared memory, cma; cuda_ipc/cuda_copy when it was built with CUDA), steered by
// its own UCX_TLS / UCX_NET_DEVICES variables; the agent's `interface` becomes UCX_NET_DEVICES.
//
// UCX has no write-with-immediate, so the immediate travels behind the data: writes are ucp_put_nbx, their
// immediates wait in a per-peer queue until an endpoint flush covering those puts completes (the bytes are then in
// the peer's memory), and go out as one active message carrying every immediate the flush released. Control
// messages wait in the same queue, so a peer sees messages and immediates in the order they were posted, as on a
// libfabric endpoint. The flush is issued once per poll for all the puts posted since the last one, so its cost is
// shared by a batch, not paid per write.
//
// UCX remote keys are opaque blobs of tens of bytes, not 64-bit keys: register_memory hands the agent its requested
// key as the "rkey", exported_keys() maps every such key to its packed UCX rkey for the metadata, and the peer's
// import_keys() / first write unpacks them.
#pragma once
#include <memory>
#include <string>

#include "transports/transport.h"

namespace kvxfer {

// interface: UCX_NET_DEVICES for this agent ("lo", "mlx5_0:1"); empty leaves UCX's own choice.
std::unique_ptr<Transport> make_ucx_transport(const std::string& interface);

// "1.13.1", the UCX library this build linked.
std::string ucx_version();
// Whether a UCP context and worker open here, and which transports UCX would use (from its resource list); the
// reason when they do not.
bool probe_ucx(std::string* detail);

}  // namespace kvxfer
