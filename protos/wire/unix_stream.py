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
from pathlib import Path

import grpc

_HEADER = struct.Struct("<IQB")  # message bytes, tensor bytes, status code
# Buffers are allocated as a header announces them, so a peer must not announce more than a call can carry.
MAX_MESSAGE_BYTES = 64 << 20  # a call's protobuf message: its expert ids and counts
MAX_TENSOR_BYTES = 16 << 30  # a call's rows, e.g. 16k tokens x top-8 x hidden 7,168 in bfloat16 is 1.9 GB
_CODES = {code.value[0]: code for code in grpc.StatusCode}


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
    sock.sendall(_HEADER.pack(len(message), len(tensor_bytes), code.value[0]) + message)
    if len(tensor_bytes):
        sock.sendall(tensor_bytes)


def receive(sock: socket.socket) -> tuple[grpc.StatusCode, bytearray, bytearray]:
    """(status code, message, tensor bytes)."""
    size, tensor_size, code = _HEADER.unpack(_exactly(sock, _HEADER.size))
    if size > MAX_MESSAGE_BYTES or tensor_size > MAX_TENSOR_BYTES:
        raise FrameTooLarge(f"a frame announced a {size}-byte message and {tensor_size} tensor bytes; the limits "
                            f"are {MAX_MESSAGE_BYTES} and {MAX_TENSOR_BYTES}")
    return _CODES.get(code, grpc.StatusCode.UNKNOWN), _exactly(sock, size), _exactly(sock, tensor_size)


def _exactly(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionResetError("the peer closed the stream")
        got += n
    return buffer
