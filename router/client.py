"""The router's edge to the workers: one call per worker per MoE layer, all in flight at once, each with a deadline.

A worker on this host is called over its Unix socket, any other over gRPC; both carry the same messages and fail
with the same status codes.
"""

import functools
import select
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import torch
from google.protobuf.message import DecodeError

from protos import expert_pb2, expert_pb2_grpc
from protos.wire import unix_stream
from protos.wire.grpc_options import KEY_METADATA, ROUTER_KEEPALIVE, message_size
from protos.wire.staging import HostStaging
from protos.wire.task_local import TaskLocal
from protos.wire.tensor import from_proto, header, raw_bytes, to_proto
from router.dispatch import Dispatch
from router.hedge import Hedge

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
    """One layer call's answers: [S, D] expert outputs in dispatch order, on the rows' device and in their dtype,
    where every failed worker's rows (`failed`: the error, and its rows' [start, end) in dispatch order) are left
    unset."""

    out: torch.Tensor
    compute_s: float = 0.0
    failed: list[tuple[ExpertCallError, int, int]] = field(default_factory=list)

    def result(self) -> tuple[torch.Tensor, float]:
        """(outputs, slowest worker's compute s), or the first failure raised."""
        if self.failed:
            raise self.failed[0][0]
        return self.out, self.compute_s


class ExpertClient:
    def __init__(self, timeout_s: float, key: str, unix_sockets: bool = True,
                 limits: unix_stream.FrameLimits = unix_stream.DEFAULT_LIMITS):
        """`key`: the application's data-path key, sent on every gRPC call. `unix_sockets`: call workers on this
        host over their Unix socket; False sends every call over gRPC."""
        self.timeout_s, self.unix_sockets, self.limits = timeout_s, unix_sockets, limits
        self._metadata = ((KEY_METADATA, key),)
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, expert_pb2_grpc.ExpertStub] = {}
        self._sockets = TaskLocal("sockets")  # address -> this task's connected Unix socket
        self._all_sockets: set[socket.socket] = set()
        self._grpc_only: set[str] = set()  # addresses with no Unix socket on this host
        self._outstanding: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter()  # hedges sent, and hedges that answered first
        self.on_reply = None  # (worker, seconds from send to answer) of every share answered
        self.staging = HostStaging()

    def drain_counters(self) -> dict[str, int]:
        """Hedges sent, and those that answered first, since the last drain."""
        with self._lock:
            out, self._counters = dict(self._counters), Counter()
        return out

    def _count(self, name: str) -> None:
        with self._lock:
            self._counters[name] += 1

    def outstanding(self) -> dict[int, int]:
        """Rows in flight per worker, from every thread using this client."""
        with self._lock:
            return dict(self._outstanding)

    def forward(self, layer: int, dispatch: Dispatch, rows: torch.Tensor, addresses: dict[int, str],
                hedge: Hedge | None = None, timeout_s: float | None = None) -> LayerReplies:
        """[S, D] rows in dispatch order, one call per worker, all in flight at once. With `hedge`, a call that has
        not answered after `hedge.after_s` races a copy of its share sent to other replicas of its experts.
        `timeout_s`: this call's deadline, at most the client's (unset: the client's)."""
        return self.collect(self.send(layer, dispatch, rows, addresses, hedge, timeout_s))

    def send(self, layer: int, dispatch: Dispatch, rows: torch.Tensor, addresses: dict[int, str],
             hedge: Hedge | None = None, timeout_s: float | None = None) -> "LayerCall":
        """`forward`'s first half: every worker's share sent. The caller may compute, then must `collect`."""
        timeout_s = min(timeout_s, self.timeout_s) if timeout_s is not None else self.timeout_s
        replies, host_rows = LayerReplies(self.staging.host_like(rows)), self.staging.to_host(rows)
        calls, start, sent = [], 0, time.monotonic()
        for worker, experts, counts in dispatch.per_worker():
            end = start + sum(counts)
            calls.append(self._call(layer, worker, addresses[worker], experts, counts, start, host_rows[start:end],
                                    timeout_s))
            start = end
        self._track(calls, +1)
        return LayerCall(layer, calls, host_rows, replies, rows.device, sent, sent + timeout_s, hedge, addresses)

    def collect(self, call: "LayerCall") -> LayerReplies:
        """`forward`'s second half: every reply of `call` read (a socket left with one would be out of step)."""
        replies, late = call.replies, []
        try:
            for share in call.shares:
                if call.hedge is not None and not _ready(share.handle, call.sent + call.hedge.after_s):
                    late.append(share)
                else:
                    self._collect(replies, call.layer, share, call.deadline)
            for share in late:  # the others are read, so their sockets are free for the hedges
                self._race(replies, call.layer, share, call.deadline, call.hedge, call.addresses, call.rows, late)
        finally:
            self._track(call.shares, -1)
        replies.out = self.staging.to_device(replies.out, call.device)
        return replies

    def _call(self, layer, worker, address, experts, counts, start, rows, timeout_s) -> "_Call":
        sent, handle = time.monotonic(), self._start(address, layer, experts, counts, rows, timeout_s)
        return _Call(worker, address, list(experts), list(counts), start, start + len(rows), handle, sent)

    def _collect(self, replies: LayerReplies, layer: int, call: "_Call", deadline: float) -> bool:
        """Read `call`'s reply into `replies`; False, with the failure recorded, if it failed."""
        try:
            out, compute_s = self._result(layer, call.worker, call.address, call.experts, call.handle, deadline,
                                          (call.end - call.start, replies.out.shape[1]))
        except ExpertCallError as error:
            replies.failed.append((error, call.start, call.end))
            return False
        replies.out[call.start:call.end] = out
        replies.compute_s = max(replies.compute_s, compute_s)
        if self.on_reply is not None:
            self.on_reply(call.worker, time.monotonic() - call.sent)
        return True

    def _race(self, replies, layer, call: "_Call", deadline, hedge: Hedge, addresses, rows, late) -> None:
        """`call` against a hedge of its share on other replicas: the first complete answer is kept, and the
        loser's connection dropped (its late reply would put the stream out of step)."""
        hedges = self._hedge(layer, call, hedge, addresses, rows, late, deadline)
        if not hedges:
            self._collect(replies, layer, call, deadline)
            return
        self._count("hedges")
        self._track(hedges, +1)
        try:
            while time.monotonic() < deadline and not _ready(call.handle, time.monotonic() + 1e-3):
                if all(_ready(h.handle, time.monotonic()) for h in hedges):
                    trial = LayerReplies(replies.out, replies.compute_s)
                    answered = [self._collect(trial, layer, h, deadline) for h in hedges]  # read them all
                    if all(answered):
                        replies.compute_s = trial.compute_s
                        self._abandon(call)
                        self._count("hedges_won")
                        return
                    break  # a hedge failed: the original call decides
            self._collect(replies, layer, call, deadline)
            for h in hedges:
                self._abandon(h)
        finally:
            self._track(hedges, -1)

    def _hedge(self, layer, call: "_Call", hedge: Hedge, addresses, rows, late: list["_Call"],
               deadline: float) -> list["_Call"]:
        """Calls carrying `call`'s share to other replicas, one per expert; none when it cannot be rerouted. Workers
        with a reply still unread on this thread's sockets are not used."""
        route = hedge.reroute(call.experts, {c.worker for c in late})
        if not route or not hedge.take():
            return []
        hedges, start = [], call.start
        for expert, count in zip(call.experts, call.counts):
            worker = route[expert]
            hedges.append(self._call(layer, worker, addresses[worker], [expert], [count], start,
                                     rows[start:start + count], max(deadline - time.monotonic(), 1e-3)))
            start += count
        return hedges

    def _abandon(self, call: "_Call") -> None:
        if isinstance(call.handle, socket.socket):
            self._drop(call.address)
        else:
            call.handle.cancel()

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
        return self._stub(address).Forward.future(request, timeout=timeout_s, metadata=self._metadata)

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

    def _reply(self, call, deadline: float) -> tuple[torch.Tensor, float]:
        if not isinstance(call, socket.socket):
            reply = call.result()
            return from_proto(reply.hidden), reply.compute_s
        call.settimeout(max(deadline - time.monotonic(), 1e-3))
        code, message, data = unix_stream.receive(call, self.limits)
        if code != grpc.StatusCode.OK:
            raise unix_stream.CallFailed(code, bytes(message).decode())
        reply = expert_pb2.ExpertForwardResponse.FromString(bytes(message))
        return from_proto(reply.hidden, data), reply.compute_s

    def _unix_socket(self, address: str) -> socket.socket | None:
        sockets = self._sockets.vars()
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
        sock = self._sockets.vars().pop(address, None)
        if sock is not None:
            sock.close()
            with self._lock:
                self._all_sockets.discard(sock)

    def _stub(self, address: str) -> expert_pb2_grpc.ExpertStub:
        if address not in self._stubs:
            options = message_size(self.limits) + ROUTER_KEEPALIVE
            self._channels[address] = grpc.insecure_channel(address, options=options)
            self._stubs[address] = expert_pb2_grpc.ExpertStub(self._channels[address])
        return self._stubs[address]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        with self._lock:
            for sock in self._all_sockets:
                sock.close()

    def _track(self, calls: list["_Call"], sign: int) -> None:
        with self._lock:
            for call in calls:
                self._outstanding[call.worker] += sign * (call.end - call.start)


class RepliesAtOnce:
    """ExpertClient's send and collect for a client whose `forward` has the replies at once (experts in the
    router's own process, a test's fake workers): there is nothing in flight to overlap."""

    def send(self, layer, dispatch, rows, addresses, hedge=None, timeout_s=None) -> LayerReplies:
        return self.forward(layer, dispatch, rows, addresses, hedge, timeout_s)

    @staticmethod
    def collect(replies: LayerReplies) -> LayerReplies:
        return replies


@dataclass
class LayerCall:
    """A layer call whose shares are sent and whose replies are not yet read."""

    layer: int
    shares: list["_Call"]
    rows: torch.Tensor  # [S, D] on the host, in dispatch order
    replies: LayerReplies
    device: torch.device  # of the rows, where the replies go
    sent: float
    deadline: float
    hedge: Hedge | None
    addresses: dict[int, str]


@dataclass
class _Call:
    """One worker's share of a layer call, in flight: its rows are [start, end) of the call's, in dispatch order."""

    worker: int
    address: str
    experts: list[int]
    counts: list[int]
    start: int
    end: int
    handle: object  # a connected Unix socket, or a gRPC future
    sent: float  # time.monotonic() when it was sent


def _ready(handle, until: float) -> bool:
    """Whether `handle`'s reply has begun to arrive (socket) or is complete (future) by `until`."""
    timeout = max(0.0, until - time.monotonic())
    if isinstance(handle, socket.socket):
        return bool(select.select([handle], [], [], timeout)[0])
    try:
        handle.exception(timeout=timeout)
        return True
    except grpc.FutureTimeoutError:
        return False
    except grpc.FutureCancelledError:
        return True
