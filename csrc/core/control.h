// Control messages between two agents, sent with fi_inject on the fabric endpoint (<= 64 bytes).
//
//   HELLO   both ways, once each side has added the other, on every rail (first_layer carries the rail index):
//           "my epoch is E, I know you as epoch F". A peer is connected (writes may be posted) once we added it and
//           its HELLO naming our epoch arrived on every rail we share, so no write waits on a rail still connecting.
//   BEGIN   sender -> receiver: slot S now carries transfer X (layers, granules per layer). May arrive after the
//           first writes of S; counts accumulate per slot until then.
//   RELEASE receiver -> sender: every granule of slot S arrived; S may be reused, and the send is DONE.
//   ABORT   sender -> receiver: transfer X in slot S failed on the sender. It carries the total granules the sender
//           posted for S (64 bits in num_layers:granules_per_layer; final: a failed send posts nothing more). The receiver fails X and
//           keeps S quarantined until it has counted exactly that many, so no late write can land in a reused slot.
//   ABORT_ACK receiver -> sender: every write the sender posted for aborted slot S has arrived; S may be reused.
//   LANDED  receiver -> sender: the batch in landing slot `slot` (of the sender's window) was copied into the pool;
//           the sender may write the next batch there (transports/staged/landing.h).
//   CANCEL  receiver -> sender: stop transfer X (Recv.cancel). A live send of X fails with Cancelled and ends with
//           the usual ABORT (its posted total); an id not live here is remembered so a later send of it is refused.
//   CANCEL_ACK sender -> receiver: nothing of X can still arrive (never sent, or everything it posted was counted:
//           RELEASE or ABORT_ACK came back), and X will not be sent. A send of X whose ABORT is still outstanding
//           gets no ACK: the receiver learns the end from the ABORT's count instead.
// Every field is checked on receipt (magic, version, size, epochs, ranges); anything else is dropped and counted.
//
// An association: both agents' epochs alone do not tell one adding of a peer from the next (a link cut off, both
// sides dropped each other, then added each other again: same agents, same epochs). Each side numbers its own
// adding of the peer (`link`, sent in its HELLO); every other message carries the number the receiver gave, so a
// message of an earlier association that arrives late (a BYE buffered while the link was down) is dropped instead
// of ending the new one.
#pragma once
#include <cstdint>

namespace kvxfer {

// BYE: the sender ended the receiver (remove_peer, a newer agent under its name, silence, or its own close); the
// receiver ends its transfers with it and posts nothing more. A receiver that may live on answers a removal with
// the ABORT totals of its own sends and a BYE of reason kByeAnswer, which the remover reads although the peer is
// lost to it: both sides then settle their ended recvs by counting.
enum class ControlType : uint16_t {
  Hello = 1, Begin = 2, Release = 3, Abort = 4, AbortAck = 5, Landed = 6, Bye = 7, Cancel = 8, CancelAck = 9,
  Ping = 10  // heartbeat: says only "still here" (AgentInfo::heartbeat_ms)
};

// BYE carries why in its xfer_id field (peers that predate this read any BYE as a removal). kByeAnswer: the BYE
// of an agent that was itself ended by a BYE (removed, silent), answering with the totals of its own sends so the
// agent that ended it can settle its recvs from it too; that agent reads it although the peer is lost to it.
// kByeRefused: the sender would not take this agent as a peer (kvxfer.fallback: it would reach it over tcp past an
// RDMA NIC); agents that predate it read it as kByeRemoved.
enum ByeReason : uint64_t { kByeRemoved = 0, kByeClosed = 1, kByeSilent = 2, kByeAnswer = 3, kByeRefused = 4 };
// A BYE with this in num_layers follows an ABORT (with its posted total) for every transfer of the sender's that
// had a slot towards the receiver: the receiver can settle each ended recv by counting (peers that predate this
// leave the field 0 and are settled as before, when their process is seen gone).
constexpr uint32_t kByeTotalsSent = 1;
// An ABORT's first_layer says why the sender ended the transfer, so the receiver names it as the BYE that follows
// will: 0 the send failed on its own (deadline, abort()); otherwise the sender is ending the whole peer.
constexpr uint32_t kAbortClosing = 1;   // the sender closed its agent
constexpr uint32_t kAbortRemoved = 2;   // the sender removed this agent (remove_peer, or a newer incarnation)
constexpr uint32_t kAbortSilent = 3;    // the sender heard nothing from this agent for its peer_timeout_s
constexpr uint32_t kAbortAnswer = 4;    // this agent ended the sender first (its recvs failed already)
// A CANCEL with this in first_layer: the receiver refused one of the transfer's landing batches (not Recv.cancel).
constexpr uint32_t kCancelRefused = 1;

struct ControlMessage {
  // 48 bytes: a doorbell entry (transports/host_ipc/doorbell.h) is this and 16 bytes, one cache line.
  static constexpr uint16_t kMagic = 0x4358;  // "XC"
  // 2: ABORT total, ABORT_ACK; 3: LANDED; 4: BYE; 5: CANCEL(_ACK); 6: PING; 7: link (magic and version narrowed)
  static constexpr uint8_t kVersion = 7;
  uint16_t magic = kMagic;
  uint8_t version = kVersion;
  uint8_t type = 0;
  // HELLO: the sender's number for this association; any other message: the receiver's, as its HELLO said (0: not
  // known, accepted).
  uint32_t link = 0;
  uint64_t sender_epoch = 0;     // the agent that sent this message
  uint64_t receiver_epoch = 0;   // the agent it is for, as the sender knows it
  uint64_t xfer_id = 0;
  uint32_t slot = 0;
  uint32_t first_layer = 0;
  uint32_t num_layers = 0;
  uint32_t granules_per_layer = 0;

  // ABORT only: the granules the sender posted for the slot, split over two 32-bit fields.
  void set_posted_total(uint64_t total) {
    num_layers = static_cast<uint32_t>(total >> 32);
    granules_per_layer = static_cast<uint32_t>(total);
  }
  uint64_t posted_total() const { return (static_cast<uint64_t>(num_layers) << 32) | granules_per_layer; }
};
static_assert(sizeof(ControlMessage) == 48, "control message must stay within a 64-byte inject and a doorbell entry");

}  // namespace kvxfer
