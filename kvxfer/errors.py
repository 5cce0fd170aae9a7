"""Typed errors. Every kvxfer failure is a KvxferError subclass whose message names the value, the limit and the fix.

The C++ core raises these by kind (csrc/bindings/errors.cpp maps csrc/core/errors.h ErrorKind -> class by name), so
each class here is named exactly after its kind.
"""


class KvxferError(Exception):
    """Base class of every kvxfer error."""


class InvalidArgument(KvxferError, ValueError):
    """A caller passed a bad value (wrong dtype, shape, empty ids, unknown option)."""


class BlockOutOfRange(InvalidArgument, IndexError):
    """A block id outside the pool, on the sending or the receiving side."""


class PoolTooSmall(InvalidArgument):
    """The memory given to a layout does not hold every block of every layer."""


class LayoutMismatch(KvxferError):
    """Two layouts cannot exchange blocks (block_size, dtype, heads, head_dim, layers or planes differ)."""


class MetadataError(KvxferError):
    """Peer metadata bytes are malformed, truncated, corrupted or of another version."""


class PeerUnknown(KvxferError):
    """A peer (or a pool of a peer) that was never added, or was removed."""


class PeerLost(KvxferError):
    """A peer died or disconnected; its transfers can never complete."""


class PeerRestarted(PeerLost):
    """A peer came back with a new incarnation epoch; transfers with the old one were abandoned."""


class TransferTimeout(KvxferError, TimeoutError):
    """A wait, or a transfer's deadline, expired."""


class TransferFailed(KvxferError):
    """A transfer failed (the message says why); its destination blocks may be partly written."""


class Cancelled(TransferFailed):
    """The receiver cancelled the transfer (Recv.cancel): the sender posts nothing more for it, and a later send of
    the same id is refused. On the receiving side, reuse the blocks once Recv.writes_over is True."""


class DuplicateTransfer(KvxferError):
    """A transfer id that is still live for the same peer was reused."""


class RegistrationFailed(KvxferError):
    """Memory could not be registered with the transport."""


class AccessViolation(KvxferError):
    """A write would land outside the memory the peer exposed."""


class TransportUnavailable(KvxferError):
    """A transport this build or this machine cannot run; `python -m kvxfer info` says why."""


class SlowFallback(TransportUnavailable):
    """A peer on another host would be reached over TCP although this host has an RDMA NIC (raised by add_peer;
    Python-side, no C++ kind). The message names the NICs, why RDMA did not open, and how to accept TCP."""


class Internal(KvxferError):
    """A kvxfer bug. Please report it with the message."""


class SignalOverflow(KvxferError):
    """LayerSignal.bind() found max_bindings forwards bound ahead of the device: the graph is not replaying, or a
    forward does not record every layer once. Nothing was lost; bind again once the device catches up."""
