"""The expert worker's same-host endpoint: `Forward` over a Unix socket, one thread per connected router thread."""

import contextlib
import os
import socket
import struct
import threading

import grpc
from google.protobuf.message import DecodeError

from experts.threads import use_process_threads
from protos import expert_pb2
from protos.wire import unix_stream
from protos.wire.tensor import header, raw_bytes


class UnixServer:
    def __init__(self, forward, address: str, limits: unix_stream.FrameLimits = unix_stream.DEFAULT_LIMITS,
                 receive_into=None):
        """`forward(request, tensor bytes) -> (output, compute s)` raises `unix_stream.CallFailed` for a failed
        call. `receive_into(n)`: where each call's n tensor bytes are received (unset: a new buffer each)."""
        self.forward, self.name, self.limits = forward, unix_stream.socket_name(address), limits
        self.receive_into = receive_into
        self._unlink()  # a socket file left by a worker that died on this address
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.name)
        self._listener.listen()
        self._connections: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="expert-unix-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed by `stop`
                return
            if not _same_user(conn):  # an abstract socket has no file permissions: any local process can connect
                conn.close()
                continue
            self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="expert-unix-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        use_process_threads()
        try:
            with contextlib.suppress(OSError):  # the router hung up, or `stop`
                self._answer(conn)
        finally:
            self._connections.discard(conn)
            conn.close()

    def _answer(self, conn: socket.socket) -> None:
        while True:
            try:
                _, message, data = unix_stream.receive(conn, self.limits, self.receive_into)
            except unix_stream.FrameTooLarge as error:  # say why, then hang up: the stream is out of step
                unix_stream.send(conn, str(error).encode(), code=grpc.StatusCode.RESOURCE_EXHAUSTED)
                return
            try:
                out, compute_s = self.forward(_parse(message), data)
            except unix_stream.CallFailed as error:
                unix_stream.send(conn, error.details.encode(), code=error.code)
                continue
            reply = expert_pb2.ExpertForwardResponse(hidden=header(out), compute_s=compute_s)
            unix_stream.send(conn, reply.SerializeToString(), raw_bytes(out))

    def stop(self) -> None:
        for sock in (self._listener, *self._connections):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the threads; routers see the worker go, as over gRPC
        self._listener.close()
        self._unlink()

    def _unlink(self) -> None:
        if not self.name.startswith("\0"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.name)


def _parse(frame: bytearray) -> expert_pb2.ExpertForwardRequest:
    try:
        return expert_pb2.ExpertForwardRequest.FromString(bytes(frame))
    except DecodeError as error:
        raise unix_stream.CallFailed(grpc.StatusCode.INVALID_ARGUMENT, f"malformed ExpertForwardRequest: {error}") from None


def _same_user(conn: socket.socket) -> bool:
    """Whether the peer runs as this process's user (or root): SO_PEERCRED, checked by the kernel."""
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid in (os.getuid(), 0)
