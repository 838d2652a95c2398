"""The router's edge to the workers: one call per worker per MoE layer, all in flight at once, each with a deadline.

A worker on this host is called over its Unix socket, any other over gRPC; both carry the same messages and fail
with the same status codes.
"""

import functools
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import torch
from google.protobuf.message import DecodeError

from protos import expert_pb2, expert_pb2_grpc, unix_stream
from protos.tensor import from_proto, header, raw_bytes, to_proto
from router.dispatch import Dispatch

CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
# A request the router built wrongly fails the same way on every replica; any other failure is the worker's.
NOT_RETRYABLE = {grpc.StatusCode.INVALID_ARGUMENT}


class ExpertCallError(RuntimeError):
    """A worker failed or missed its deadline; `status` is its gRPC status code."""

    def __init__(self, worker: int, address: str, layer: int, experts: list[int], status, details: str):
        super().__init__(f"expert worker {address} failed layer {layer} experts {experts}: {status.name}: {details}")
        self.worker, self.address, self.layer, self.experts, self.status = worker, address, layer, experts, status

    @property
    def retryable(self) -> bool:
        return self.status not in NOT_RETRYABLE


@dataclass
class LayerReplies:
    """One layer call's answers: [S, D] expert outputs in dispatch order, where every failed worker's rows
    (`failed`: the error, and its rows' [start, end) in dispatch order) are left unset."""

    out: torch.Tensor
    compute_s: float = 0.0
    failed: list[tuple[ExpertCallError, int, int]] = field(default_factory=list)

    def result(self) -> tuple[torch.Tensor, float]:
        """(outputs, slowest worker's compute s), or the first failure raised."""
        if self.failed:
            raise self.failed[0][0]
        return self.out, self.compute_s


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

    def forward(self, layer: int, dispatch: Dispatch, rows: torch.Tensor, addresses: dict[int, str]) -> LayerReplies:
        """[S, D] rows in dispatch order, one call per worker, all in flight at once."""
        calls, start, deadline = [], 0, time.monotonic() + self.timeout_s
        for worker, experts, counts in dispatch.per_worker():
            end = start + sum(counts)
            call = self._start(addresses[worker], layer, experts, counts, rows[start:end], self.timeout_s)
            calls.append((worker, addresses[worker], experts, start, end, call))
            start = end
        self._track(calls, +1)
        replies = LayerReplies(torch.empty_like(rows))
        try:
            for worker, address, experts, start, end, call in calls:  # every reply is read: a socket left with
                try:                                                   # one would be out of step
                    out, compute_s = self._result(layer, worker, address, experts, call, deadline,
                                                  (end - start, rows.shape[1]))
                    replies.out[start:end] = out
                    replies.compute_s = max(replies.compute_s, compute_s)
                except ExpertCallError as error:
                    replies.failed.append((error, start, end))
        finally:
            self._track(calls, -1)
        return replies

    def probe(self, worker: int, address: str, layer: int, expert: int, row: torch.Tensor, timeout_s: float) -> None:
        """One row through one hosted expert, the way real calls go; raises ExpertCallError unless it answers."""
        call = self._start(address, layer, [expert], [1], row, timeout_s)
        self._result(layer, worker, address, [expert], call, time.monotonic() + timeout_s, tuple(row.shape))

    def _start(self, address: str, layer: int, experts: list[int], counts: list[int], rows: torch.Tensor,
               timeout_s: float):
        """Send the call; returns what `_result` waits on: a Unix socket, or a gRPC future."""
        sock = self._unix_socket(address) if self.unix_sockets else None
        if sock is not None:
            request = expert_pb2.ExpertForwardRequest(layer=layer, experts=experts, counts=counts, hidden=header(rows))
            try:
                sock.settimeout(timeout_s)
                unix_stream.send(sock, request.SerializeToString(), raw_bytes(rows))
                return sock
            except OSError:
                self._drop(address)
        request = expert_pb2.ExpertForwardRequest(layer=layer, experts=experts, counts=counts, hidden=to_proto(rows))
        return self._stub(address).Forward.future(request, timeout=timeout_s)

    def _result(self, layer: int, worker: int, address: str, experts: list[int], call, deadline: float,
                shape: tuple[int, int]):
        """(expert outputs of `shape`, compute seconds) of one call."""
        fail = functools.partial(ExpertCallError, worker, address, layer, experts)
        try:
            out, compute_s = self._reply(call, deadline)
        except grpc.RpcError as error:
            raise fail(error.code(), error.details()) from None
        except unix_stream.CallFailed as error:
            raise fail(error.code, error.details) from None
        except TimeoutError:
            self._drop(address)  # a late reply would desynchronise the stream
            raise fail(grpc.StatusCode.DEADLINE_EXCEEDED, "no reply before the deadline") from None
        except OSError as error:
            self._drop(address)
            raise fail(grpc.StatusCode.UNAVAILABLE, str(error)) from None
        except (ValueError, DecodeError) as error:  # bytes that are no reply
            self._drop(address)
            raise fail(grpc.StatusCode.DATA_LOSS, f"malformed reply: {error}") from None
        if tuple(out.shape) != shape:
            raise fail(grpc.StatusCode.DATA_LOSS, f"malformed reply: shape {tuple(out.shape)}, expected {shape}")
        return out, compute_s

    @staticmethod
    def _reply(call, deadline: float) -> tuple[torch.Tensor, float]:
        if not isinstance(call, socket.socket):
            reply = call.result()
            return from_proto(reply.hidden), reply.compute_s
        call.settimeout(max(deadline - time.monotonic(), 1e-3))
        code, message, data = unix_stream.receive(call)
        if code != grpc.StatusCode.OK:
            raise unix_stream.CallFailed(code, bytes(message).decode())
        reply = expert_pb2.ExpertForwardResponse.FromString(bytes(message))
        return from_proto(reply.hidden, data), reply.compute_s

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
            for worker, _, _, start, end, _ in calls:
                self._outstanding[worker] += sign * (end - start)
