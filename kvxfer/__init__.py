"""kvxfer: KV-cache transfer for disaggregated LLM serving.

Paged KV blocks move from a prefill process straight into a decode process's KV cache, layer by layer, and the
receiver learns that each layer arrived by counting immediate data, exactly and in any order.
"""
import os as _os

# Debian's libfabric carries the psm provider, whose libinfinipath installs SIGSEGV/SIGBUS/SIGILL handlers when it
# loads (with _C): they would replace the engine's own (Python's faulthandler, a crash reporter) and end a crashing
# process with exit status 1 and a backtrace on a stderr the engine may not show. Off unless the user set it.
_os.environ.setdefault("IPATH_NO_BACKTRACE", "1")
# A removed or lost peer's hidden rxm connection (tcp, verbs) is closed when the agent drops its address
# (Agent.release_lost_peer), instead of staying open for the process's lifetime; libfabric reads it at its first use.
_os.environ.setdefault("FI_AV_REMOVE_CLEANUP", "1")
# rxm (tcp, verbs) gives every endpoint pools of bounce buffers of this size (~4000 here), touched when it opens:
# at libfabric's default 16 KiB that is 68 MiB of RSS and 50-250 ms per agent. kvxfer's messages are at most 256
# bytes and its data goes as RMA writes straight from registered memory (rxm copies only inject writes), so 1 KiB
# loses nothing and costs 8.5 MiB and ~6 ms (benchmarks/bench_agent_cost.py). Read once, at libfabric's first use.
_os.environ.setdefault("FI_OFI_RXM_BUFFER_SIZE", "1024")

from kvxfer import errors  # noqa: E402
from kvxfer.errors import KvxferError  # noqa: E402
from kvxfer.layout import KVLayout  # noqa: E402
from kvxfer.transfer import Recv, RecvGroup, Send, SendGroup, TransferState  # noqa: E402
from kvxfer.agent import Agent, Peer, Pool  # noqa: E402
from kvxfer.signals import DeviceCounter, LayerSignal  # noqa: E402
from kvxfer import tp  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Agent", "Peer", "Pool", "KVLayout", "Send", "SendGroup", "Recv", "RecvGroup", "TransferState", "tp", "LayerSignal", "DeviceCounter", "KvxferError", "errors", "__version__"]
