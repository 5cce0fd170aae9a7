// Error kinds. C++ throws Error{kind, message}; bindings/errors.cpp maps each kind to one kvxfer.errors class.
// KVXFER_CHECK is for bad input from the caller or the wire; KVXFER_ASSERT is for our own bugs only.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace kvxfer {

enum class ErrorKind {
  InvalidArgument,     // a caller passed a bad value (wrong dtype, empty array, ...)
  BlockOutOfRange,     // a block id outside the pool on either side
  PoolTooSmall,        // memory given to a layout does not hold it
  LayoutMismatch,      // two layouts that cannot exchange blocks
  MetadataError,       // malformed / truncated / wrong-version metadata bytes
  PeerUnknown,         // a peer that was never added or was removed
  PeerLost,            // a peer that died or disconnected mid-transfer
  PeerRestarted,       // a peer came back with a new incarnation epoch
  TransferTimeout,     // a wait or a transfer deadline expired
  TransferFailed,      // a transfer failed for another reason (see message)
  Cancelled,           // the receiver cancelled the transfer (Recv.cancel)
  DuplicateTransfer,   // a live transfer id reused for the same peer
  RegistrationFailed,  // memory could not be registered
  AccessViolation,     // a write outside what the peer exposed
  TransportUnavailable,// a transport that this build or machine cannot run
  Internal,            // our bug
};

const char* error_kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

// Stream-style message building: KVXFER_CHECK(n > 0, InvalidArgument, "n=" << n << " must be > 0").
#define KVXFER_THROW(kind, msg)                                  \
  do {                                                           \
    std::ostringstream kvxfer_oss_;                              \
    kvxfer_oss_ << msg;                                          \
    throw ::kvxfer::Error(::kvxfer::ErrorKind::kind, kvxfer_oss_.str()); \
  } while (0)

#define KVXFER_CHECK(cond, kind, msg) \
  do {                                \
    if (!(cond)) KVXFER_THROW(kind, msg); \
  } while (0)

#define KVXFER_ASSERT(cond)                                                                            \
  do {                                                                                                 \
    if (!(cond)) KVXFER_THROW(Internal, "kvxfer internal error: " #cond " at " << __FILE__ << ":" << __LINE__ \
                                        << " (please report this bug)");                              \
  } while (0)

}  // namespace kvxfer
