"""Tensors on the wire: raw bytes with dtype and shape, never pickled.

Over gRPC the bytes ride in `Tensor.data`; on a Unix socket they follow the message, sent from and received
into the tensor's own memory.
"""

import warnings

import torch

from protos import expert_pb2

_DTYPES = {name: getattr(torch, name) for name in ("float32", "bfloat16", "float16", "float64")}


def header(tensor: torch.Tensor) -> expert_pb2.Tensor:
    """dtype and shape, without the bytes."""
    return expert_pb2.Tensor(dtype=str(tensor.dtype).removeprefix("torch."), shape=tensor.shape)


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order, without a copy when it is contiguous on the CPU."""
    return memoryview(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def to_proto(tensor: torch.Tensor) -> expert_pb2.Tensor:
    message = header(tensor)
    message.data = raw_bytes(tensor).tobytes() if tensor.numel() else b""
    return message


def from_proto(message: expert_pb2.Tensor, data: bytes | bytearray | memoryview | None = None) -> torch.Tensor:
    """The tensor `message` describes, over `data` (default: its own `data` field), without copying it."""
    dtype = _DTYPES.get(message.dtype)
    if dtype is None:
        raise ValueError(f"unsupported tensor dtype {message.dtype!r}; expected one of {sorted(_DTYPES)}")
    shape = tuple(message.shape)
    data = message.data if data is None else data  # each read of `message.data` copies it: read it once
    expected = dtype.itemsize * torch.Size(shape).numel()
    if len(data) != expected:
        raise ValueError(f"tensor of shape {shape} and dtype {message.dtype} needs {expected} bytes, got {len(data)}")
    if not expected:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # Immutable `bytes` are only ever read here, so sharing them is safe.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)
