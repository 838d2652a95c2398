"""Expert calls between processes on one host: the same protobuf messages as gRPC on a Unix socket, each
followed by its tensor's raw bytes. Python gRPC hops threads several times per call and copies each payload
several times; this costs one send and one receive, from and into the tensors' own memory.

A worker advertised at `address` (host:port) listens on `socket_name(address)`; a router that can connect
to that socket on its own host uses it, and gRPC otherwise.
"""

import re
import socket
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

_HEADER = struct.Struct("<IQB")  # message bytes, tensor bytes, status code
_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class FrameLimits:
    """Buffers are allocated as a header announces them, so a peer must not announce more than a call can carry
    (the serving config's limits.frame_message_bytes and frame_tensor_bytes)."""

    message_bytes: int = 64 << 20  # a call's protobuf message: its expert ids and counts
    tensor_bytes: int = 16 << 30  # a call's rows to one worker

    @classmethod
    def of(cls, limits) -> "FrameLimits":
        """From a LimitsConfig."""
        return cls(limits.frame_message_bytes, limits.frame_tensor_bytes)


DEFAULT_LIMITS = FrameLimits()


class FrameTooLarge(ConnectionError):
    """A header announced more bytes than the limits allow; the stream cannot be read past it."""


class CallFailed(Exception):
    """The call failed with gRPC status `code`, exactly as the gRPC transport would report it."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


def socket_name(address: str) -> str:
    """On Linux an abstract socket, which goes away with its worker (no file left behind by a killed one);
    elsewhere a file in the temporary directory."""
    name = f"moecluster-expert-{re.sub(r'[^A-Za-z0-9.]+', '-', address)}"
    if sys.platform == "linux":
        return f"\0{name}"
    return str(Path(tempfile.gettempdir()) / f"{name}.sock")


def send(sock: socket.socket, message: bytes, tensor_bytes: memoryview | bytes = b"",
         code: grpc.StatusCode = grpc.StatusCode.OK) -> None:
    """One frame in one system call where the socket takes it whole (a scatter-gather send, no joined copy)."""
    parts = [memoryview(_HEADER.pack(len(message), len(tensor_bytes), code.value[0]) + message).cast("B")]
    if len(tensor_bytes):
        parts.append(memoryview(tensor_bytes).cast("B"))
    while parts:
        sent = sock.sendmsg(parts)
        while parts and sent >= len(parts[0]):
            sent -= len(parts.pop(0))
        if parts:
            parts[0] = parts[0][sent:]


def receive(sock: socket.socket, limits: FrameLimits = DEFAULT_LIMITS, into: Callable[[int], memoryview] | None = None
            ) -> tuple[grpc.StatusCode, bytearray, bytearray | memoryview]:
    """(status code, message, tensor bytes). `into(n)`: a writable buffer of n bytes to receive the tensor bytes
    in (unset: a new bytearray)."""
    size, tensor_size, code = _HEADER.unpack(_exactly(sock, _HEADER.size))
    if size > limits.message_bytes or tensor_size > limits.tensor_bytes:
        raise FrameTooLarge(f"a frame announced a {size}-byte message and {tensor_size} tensor bytes; the limits "
                            f"are {limits.message_bytes} and {limits.tensor_bytes} (limits.frame_message_bytes, "
                            "limits.frame_tensor_bytes)")
    message = _exactly(sock, size)
    tensor = _exactly(sock, tensor_size, into(tensor_size) if into is not None else None)
    return _CODES.get(code, grpc.StatusCode.UNKNOWN), message, tensor


def _exactly(sock: socket.socket, size: int, buffer: memoryview | None = None) -> bytearray | memoryview:
    buffer = bytearray(size) if buffer is None else buffer
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionResetError("the peer closed the stream")
        got += n
    return buffer
