#include "core/errors.h"

namespace kvxfer {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::InvalidArgument: return "InvalidArgument";
    case ErrorKind::BlockOutOfRange: return "BlockOutOfRange";
    case ErrorKind::PoolTooSmall: return "PoolTooSmall";
    case ErrorKind::LayoutMismatch: return "LayoutMismatch";
    case ErrorKind::MetadataError: return "MetadataError";
    case ErrorKind::PeerUnknown: return "PeerUnknown";
    case ErrorKind::PeerLost: return "PeerLost";
    case ErrorKind::PeerRestarted: return "PeerRestarted";
    case ErrorKind::TransferTimeout: return "TransferTimeout";
    case ErrorKind::TransferFailed: return "TransferFailed";
    case ErrorKind::Cancelled: return "Cancelled";
    case ErrorKind::DuplicateTransfer: return "DuplicateTransfer";
    case ErrorKind::RegistrationFailed: return "RegistrationFailed";
    case ErrorKind::AccessViolation: return "AccessViolation";
    case ErrorKind::TransportUnavailable: return "TransportUnavailable";
    case ErrorKind::Internal: return "Internal";
  }
  return "Internal";
}

}  // namespace kvxfer
