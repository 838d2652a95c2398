"""The router's edge to the workers: one call per worker per MoE layer, all in flight at once, each with a deadline.

A worker on this host is called over its Unix socket, any other over gRPC; both carry the same messages and fail
with the same status codes.
"""

import socket
import threading
import time
from collections import Counter

import grpc
import torch

from protos import expert_pb2, expert_pb2_grpc, unix_stream
from protos.tensor import from_proto, header, raw_bytes, to_proto
from router.dispatch import Dispatch

CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
# A replica that is gone, or no longer hosts the expert, is worth retrying elsewhere; other errors are not.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.DEADLINE_EXCEEDED}


class ExpertCallError(RuntimeError):
    """A worker failed or missed its deadline; `status` is its gRPC status code."""

    def __init__(self, worker: int, address: str, layer: int, experts: list[int], status, details: str):
        super().__init__(f"expert worker {address} failed layer {layer} experts {experts}: {status.name}: {details}")
        self.worker, self.address, self.layer, self.experts, self.status = worker, address, layer, experts, status

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE


class ExpertClient:
    def __init__(self, timeout_s: float, unix_sockets: bool = True):
        """`unix_sockets`: call workers on this host over their Unix socket; False sends every call over gRPC."""
        self.timeout_s, self.unix_sockets = timeout_s, unix_sockets
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, expert_pb2_grpc.ExpertStub] = {}
        self._sockets = threading.local()  # address -> this thread's connected Unix socket
        self._all_sockets: set[socket.socket] = set()
        self._grpc_only: set[str] = set()  # addresses with no Unix socket on this host
        self._outstanding: Counter[int] = Counter()
        self._lock = threading.Lock()

    def outstanding(self) -> dict[int, int]:
        """Rows in flight per worker, from every thread using this client."""
        with self._lock:
            return dict(self._outstanding)

    def forward(self, layer: int, dispatch: Dispatch, rows: torch.Tensor, addresses: dict[int, str]):
        """[S, D] rows in dispatch order -> ([S, D] unweighted expert outputs, same order; slowest worker's compute s)."""
        calls, start, deadline = [], 0, time.monotonic() + self.timeout_s
        for worker, experts, counts in dispatch.per_worker():
            end = start + sum(counts)
            call = self._start(addresses[worker], layer, experts, counts, rows[start:end])
            calls.append((worker, addresses[worker], experts, end - start, call))
            start = end
        self._track(calls, +1)
        replies, failure = [], None
        try:
            for call in calls:  # every reply is read, even after a failure: a socket left with one would desync
                try:
                    replies.append(self._result(layer, *call, deadline))
                except ExpertCallError as error:
                    failure = failure or error
        finally:
            self._track(calls, -1)
        if failure is not None:
            raise failure
        out = torch.cat([tensor for tensor, _ in replies]).to(rows.dtype)
        return out, max(compute_s for _, compute_s in replies)

    def _start(self, address: str, layer: int, experts: list[int], counts: list[int], rows: torch.Tensor):
        """Send the call; returns what `_result` waits on: a Unix socket, or a gRPC future."""
        sock = self._unix_socket(address) if self.unix_sockets else None
        if sock is not None:
            request = expert_pb2.ExpertForwardRequest(layer=layer, experts=experts, counts=counts, hidden=header(rows))
            try:
                sock.settimeout(self.timeout_s)
                unix_stream.send(sock, request.SerializeToString(), raw_bytes(rows))
                return sock
            except OSError:
                self._drop(address)
        request = expert_pb2.ExpertForwardRequest(layer=layer, experts=experts, counts=counts, hidden=to_proto(rows))
        return self._stub(address).Forward.future(request, timeout=self.timeout_s)

    def _result(self, layer: int, worker: int, address: str, experts: list[int], _: int, call, deadline: float):
        """(expert outputs, compute seconds) of one call."""
        try:
            if not isinstance(call, socket.socket):
                reply = call.result()
                return from_proto(reply.hidden), reply.compute_s
            call.settimeout(max(deadline - time.monotonic(), 1e-3))
            code, message, data = unix_stream.receive(call)
            if code != grpc.StatusCode.OK:
                raise unix_stream.CallFailed(code, bytes(message).decode())
            reply = expert_pb2.ExpertForwardResponse.FromString(bytes(message))
            return from_proto(reply.hidden, data), reply.compute_s
        except grpc.RpcError as error:
            raise ExpertCallError(worker, address, layer, experts, error.code(), error.details()) from None
        except unix_stream.CallFailed as error:
            raise ExpertCallError(worker, address, layer, experts, error.code, error.details) from None
        except TimeoutError:
            self._drop(address)  # a late reply would desynchronise the stream
            raise ExpertCallError(worker, address, layer, experts, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"no reply within {self.timeout_s}s") from None
        except OSError as error:
            self._drop(address)
            raise ExpertCallError(worker, address, layer, experts, grpc.StatusCode.UNAVAILABLE, str(error)) from None

    def _unix_socket(self, address: str) -> socket.socket | None:
        sockets = self._sockets.__dict__
        if address not in sockets and address not in self._grpc_only:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(unix_stream.socket_name(address))
            except OSError:  # a worker on another host, or one that is gone
                sock.close()
                self._grpc_only.add(address)
                return None
            sockets[address] = sock
            with self._lock:
                self._all_sockets.add(sock)
        return sockets.get(address)

    def _drop(self, address: str) -> None:
        sock = self._sockets.__dict__.pop(address, None)
        if sock is not None:
            sock.close()
            with self._lock:
                self._all_sockets.discard(sock)

    def _stub(self, address: str) -> expert_pb2_grpc.ExpertStub:
        if address not in self._stubs:
            self._channels[address] = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._stubs[address] = expert_pb2_grpc.ExpertStub(self._channels[address])
        return self._stubs[address]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        with self._lock:
            for sock in self._all_sockets:
                sock.close()

    def _track(self, calls, sign: int) -> None:
        with self._lock:
            for worker, _, _, n, _ in calls:
                self._outstanding[worker] += sign * n
