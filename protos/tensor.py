"""Tensors on the wire: raw bytes with dtype and shape, one copy each way, never pickled."""

import warnings

import torch

from protos import expert_pb2

_DTYPES = {name: getattr(torch, name) for name in ("float32", "bfloat16", "float16", "float64")}


def to_proto(tensor: torch.Tensor) -> expert_pb2.Tensor:
    tensor = tensor.detach().contiguous().cpu()
    data = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return expert_pb2.Tensor(data=data, dtype=str(tensor.dtype).removeprefix("torch."), shape=tensor.shape)


def from_proto(message: expert_pb2.Tensor) -> torch.Tensor:
    dtype = _DTYPES.get(message.dtype)
    if dtype is None:
        raise ValueError(f"unsupported tensor dtype {message.dtype!r}; expected one of {sorted(_DTYPES)}")
    shape, data = tuple(message.shape), message.data  # each read of `data` copies it: read it once
    expected = dtype.itemsize * torch.Size(shape).numel()
    if len(data) != expected:
        raise ValueError(f"tensor of shape {shape} and dtype {message.dtype} needs {expected} bytes, got {len(data)}")
    if not expected:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # The bytes are immutable; the tensor is only read, so sharing them is safe.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)
