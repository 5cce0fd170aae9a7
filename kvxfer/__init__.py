"""kvxfer: KV-cache transfer for disaggregated LLM serving.

Paged KV blocks move from a prefill process straight into a decode process's KV cache, layer by layer, and the
receiver learns that each layer arrived by counting immediate data, exactly and in any order.
"""
from kvxfer import errors
from kvxfer.errors import KvxferError
from kvxfer.layout import KVLayout
from kvxfer.transfer import Recv, RecvGroup, Send, SendGroup, TransferState
from kvxfer.agent import Agent, Peer, Pool
from kvxfer.signals import DeviceCounter, LayerSignal
from kvxfer import tp

__version__ = "0.1.0"

__all__ = ["Agent", "Peer", "Pool", "KVLayout", "Send", "SendGroup", "Recv", "RecvGroup", "TransferState", "tp", "LayerSignal", "DeviceCounter", "KvxferError", "errors", "__version__"]
