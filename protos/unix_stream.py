"""Expert calls between processes on one host: the same protobuf messages as gRPC, length-prefixed on a Unix
socket. Python gRPC hops threads several times per call; this costs one send and one receive.

A worker advertised at `address` (host:port) listens on `socket_path(address)`; a router that finds that file
on its own host uses it, and gRPC otherwise.
"""

import os
import re
import socket
import struct
import tempfile
from pathlib import Path

import grpc

_HEADER = struct.Struct("<IB")  # payload bytes, status code
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class CallFailed(Exception):
    """The call failed with gRPC status `code`, exactly as the gRPC transport would report it."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


def socket_path(address: str) -> Path:
    directory = Path(os.environ.get("MOECLUSTER_SOCKET_DIR", Path(tempfile.gettempdir()) / "moecluster"))
    return directory / f"expert-{re.sub(r'[^A-Za-z0-9.]+', '-', address)}.sock"


def send(sock: socket.socket, payload: bytes, code: grpc.StatusCode = grpc.StatusCode.OK) -> None:
    sock.sendall(_HEADER.pack(len(payload), code.value[0]) + payload)


def receive(sock: socket.socket) -> tuple[grpc.StatusCode, bytearray]:
    size, code = _HEADER.unpack(_exactly(sock, _HEADER.size))
    return _CODES[code], _exactly(sock, size)


def _exactly(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionResetError("the peer closed the stream")
        got += n
    return buffer
