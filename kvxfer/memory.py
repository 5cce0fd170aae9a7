"""as_region(obj): numpy arrays, torch tensors, cupy arrays or (ptr, nbytes, device) -> a registered range.

Never imports torch or cupy: objects are recognized by their attributes.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvxfer.errors import InvalidArgument


@dataclass(frozen=True)
class MemoryRegion:
    addr: int
    nbytes: int
    device: int  # -1 host, >= 0 CUDA device


def as_region(obj) -> MemoryRegion:
    if isinstance(obj, tuple) and len(obj) == 3:
        ptr, nbytes, device = (int(v) for v in obj)
        if ptr <= 0 or nbytes <= 0:
            raise InvalidArgument(f"raw range ({ptr:#x}, {nbytes}, {device}) must have a non-null pointer and size > 0")
        return MemoryRegion(ptr, nbytes, device)
    if hasattr(obj, "data_ptr") and hasattr(obj, "element_size"):  # torch.Tensor
        if not obj.is_contiguous():
            raise InvalidArgument("torch tensor is not contiguous; register the contiguous KV cache tensor itself")
        device = obj.device.index if obj.device.type == "cuda" else -1
        if obj.device.type not in ("cpu", "cuda"):
            raise InvalidArgument(f"torch tensors on {obj.device} cannot be registered (cpu or cuda only)")
        return MemoryRegion(obj.data_ptr(), obj.numel() * obj.element_size(), device if device is not None else 0)
    if hasattr(obj, "__cuda_array_interface__"):  # cupy, numba and friends
        cai = obj.__cuda_array_interface__
        shape, itemsize = tuple(cai["shape"]), _itemsize(cai["typestr"])
        if cai.get("strides") is not None and tuple(cai["strides"]) != _c_strides(shape, itemsize):
            raise InvalidArgument("CUDA array is not C-contiguous; register a contiguous array (cupy.ascontiguousarray)")
        nbytes = itemsize
        for d in shape:
            nbytes *= d
        device = getattr(getattr(obj, "device", None), "id", None)
        if device is None:
            raise InvalidArgument("CUDA array does not say its device (.device.id); pass (ptr, nbytes, device) instead")
        if cai["data"][1]:
            raise InvalidArgument("CUDA array is read-only; a peer could not write into it")
        stream = cai.get("stream")
        if isinstance(stream, int) and stream > 0:  # work queued on it (a fill) lands before kvxfer's streams use it
            from kvxfer import _C

            _C.cuda_stream_synchronize(stream, int(device))
        return MemoryRegion(cai["data"][0], int(nbytes), int(device))
    if hasattr(obj, "__array_interface__"):  # numpy
        if not obj.flags["C_CONTIGUOUS"]:
            raise InvalidArgument("numpy array is not C-contiguous; use np.ascontiguousarray")
        if not obj.flags["WRITEABLE"]:
            raise InvalidArgument("numpy array is read-only; a peer could not write into it")
        return MemoryRegion(obj.__array_interface__["data"][0], int(obj.nbytes), -1)
    raise InvalidArgument(f"cannot register {type(obj).__name__}: pass a numpy array, a torch tensor, a CUDA array "
                          "or a (ptr, nbytes, device) tuple")


def _itemsize(typestr: str) -> int:
    return int(typestr[2:])  # "<f2" -> 2, "|u1" -> 1


def _c_strides(shape: tuple, itemsize: int) -> tuple:
    strides, step = [], itemsize
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return tuple(reversed(strides))
