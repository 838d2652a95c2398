"""The expert worker's gRPC server: Forward, plus the standard health and reflection services."""

import time
from collections import Counter
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from experts.bank import ExpertBank, ExpertNotHosted
from protos import expert_pb2, expert_pb2_grpc
from protos.tensor import from_proto, to_proto

SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["Expert"].full_name
_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


class ExpertServicer(expert_pb2_grpc.ExpertServicer):
    def __init__(self, bank: ExpertBank):
        self.bank = bank
        self.tokens: Counter[tuple[int, int]] = Counter()
        self.compute_s = 0.0

    def Forward(self, request, context):
        try:
            hidden = from_proto(request.hidden)
            _check_groups(request, hidden.shape)
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        start = time.perf_counter()
        try:
            out = self.bank.forward(request.layer, list(request.experts), list(request.counts), hidden)
        except ExpertNotHosted as error:
            context.abort(grpc.StatusCode.NOT_FOUND, f"layer {request.layer}: {error.args[0]}")
        elapsed = time.perf_counter() - start
        self.compute_s += elapsed
        self.tokens.update({(request.layer, e): c for e, c in zip(request.experts, request.counts)})
        return expert_pb2.ExpertForwardResponse(hidden=to_proto(out.to(hidden.dtype)), compute_s=elapsed)


def _check_groups(request, shape) -> None:
    if len(request.experts) != len(request.counts):
        raise ValueError(f"{len(request.experts)} experts but {len(request.counts)} counts")
    if len(shape) != 2 or sum(request.counts) != shape[0]:
        raise ValueError(f"hidden of shape {tuple(shape)} does not hold {sum(request.counts)} rows")


def serve(bank: ExpertBank, port: int = 0, threads: int = 8) -> tuple[grpc.Server, ExpertServicer, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=_OPTIONS)
    servicer = ExpertServicer(bank)
    expert_pb2_grpc.add_ExpertServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"[::]:{port}")
    server.start()
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, servicer, bound
