"""The router's gRPC edge: one call per worker per MoE layer, all in flight at once, each with a deadline."""

import threading
from collections import Counter

import grpc
import torch

from protos import expert_pb2, expert_pb2_grpc
from protos.tensor import from_proto, to_proto
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
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, expert_pb2_grpc.ExpertStub] = {}
        self._outstanding: Counter[int] = Counter()
        self._lock = threading.Lock()

    def outstanding(self) -> dict[int, int]:
        """Rows in flight per worker, from every thread using this client."""
        with self._lock:
            return dict(self._outstanding)

    def forward(self, layer: int, dispatch: Dispatch, rows: torch.Tensor, addresses: dict[int, str]):
        """[S, D] rows in dispatch order -> ([S, D] unweighted expert outputs, same order; slowest worker's compute s)."""
        calls, start = [], 0
        for worker, experts, counts in dispatch.per_worker():
            end = start + sum(counts)
            request = expert_pb2.ExpertForwardRequest(
                layer=layer, experts=experts, counts=counts, hidden=to_proto(rows[start:end])
            )
            future = self._stub(addresses[worker]).Forward.future(request, timeout=self.timeout_s)
            calls.append((worker, addresses[worker], experts, end - start, future))
            start = end
        self._track(calls, +1)
        try:
            replies = [self._result(layer, *call) for call in calls]
        finally:
            self._track(calls, -1)
        out = torch.cat([from_proto(r.hidden) for r in replies]).to(rows.dtype)
        return out, max(r.compute_s for r in replies)

    def _stub(self, address: str) -> expert_pb2_grpc.ExpertStub:
        if address not in self._stubs:
            self._channels[address] = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._stubs[address] = expert_pb2_grpc.ExpertStub(self._channels[address])
        return self._stubs[address]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def _track(self, calls, sign: int) -> None:
        with self._lock:
            for worker, _, _, n, _ in calls:
                self._outstanding[worker] += sign * n

    @staticmethod
    def _result(layer: int, worker: int, address: str, experts: list[int], _: int, future):
        try:
            return future.result()
        except grpc.RpcError as error:
            raise ExpertCallError(worker, address, layer, experts, error.code(), error.details()) from None
