"""The router's gRPC edge: one call per worker per MoE layer, all in flight at once, each with a deadline."""

import grpc
import torch

from protos import expert_pb2, expert_pb2_grpc
from protos.tensor import from_proto, to_proto
from router.dispatch import Dispatch

CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


class ExpertCallError(RuntimeError):
    """A worker failed or missed its deadline; `status` is its gRPC status code."""

    def __init__(self, address: str, layer: int, experts: list[int], status: grpc.StatusCode, details: str):
        super().__init__(f"expert worker {address} failed layer {layer} experts {experts}: {status.name}: {details}")
        self.address, self.layer, self.experts, self.status = address, layer, experts, status


class ExpertClient:
    def __init__(self, addresses: list[str], timeout_s: float):
        self.addresses = list(addresses)
        self.timeout_s = timeout_s
        self._channels = [grpc.insecure_channel(a, options=CHANNEL_OPTIONS) for a in self.addresses]
        self._stubs = [expert_pb2_grpc.ExpertStub(c) for c in self._channels]

    def forward(self, layer: int, dispatch: Dispatch, rows: torch.Tensor) -> torch.Tensor:
        """[S, D] rows in dispatch order -> [S, D] unweighted expert outputs, same order."""
        calls, start = [], 0
        for worker, experts, counts in dispatch.per_worker():
            end = start + sum(counts)
            request = expert_pb2.ExpertForwardRequest(
                layer=layer, experts=experts, counts=counts, hidden=to_proto(rows[start:end])
            )
            calls.append((worker, experts, self._stubs[worker].Forward.future(request, timeout=self.timeout_s)))
            start = end
        return torch.cat([self._result(layer, *call) for call in calls]).to(rows.dtype)

    def _result(self, layer: int, worker: int, experts: list[int], future) -> torch.Tensor:
        try:
            return from_proto(future.result().hidden)
        except grpc.RpcError as error:
            raise ExpertCallError(self.addresses[worker], layer, experts, error.code(), error.details()) from None

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
