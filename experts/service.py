"""The expert worker's servers: Forward over gRPC with the standard health and reflection services, and the same
Forward over a Unix socket for routers on the worker's own host."""

import threading
import time
from collections import Counter
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from experts.access import RequireKey
from experts.bank import ExpertBank, ExpertNotHosted
from experts.threads import use_process_threads
from experts.unix_server import UnixServer
from protos import expert_pb2, expert_pb2_grpc
from protos.wire.grpc_options import WORKER_KEEPALIVE, message_size
from protos.wire.staging import HostStaging
from protos.wire.tensor import from_proto, to_proto
from protos.wire.unix_stream import DEFAULT_LIMITS, CallFailed, FrameLimits

SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["Expert"].full_name


class ExpertServicer(expert_pb2_grpc.ExpertServicer):
    def __init__(self, bank: ExpertBank):
        self.bank = bank
        self.malformed_replies = False  # fault injection: answer with a row missing, as a corrupted reply would
        self.tokens: Counter[tuple[int, int]] = Counter()
        self.compute_s = 0.0
        self.staging = HostStaging()
        self._stats_lock = threading.Lock()  # gRPC handlers and Unix-socket connections count concurrently

    def Forward(self, request, context):
        try:
            out, compute_s = self.forward(request)
        except CallFailed as error:
            context.abort(error.code, error.details)
        return expert_pb2.ExpertForwardResponse(hidden=to_proto(out), compute_s=compute_s)

    def forward(self, request: expert_pb2.ExpertForwardRequest, data: bytearray | None = None):
        """Both transports' Forward -> (expert outputs on the host in the request's dtype, valid until this
        thread's next call; compute seconds, the copies to and from the bank's device included). The hidden rows'
        bytes are `data`, or else in the request; a bad request raises CallFailed with its status code."""
        try:
            hidden = from_proto(request.hidden, data)
            _check_groups(request, hidden.shape)
        except ValueError as error:
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        start = time.perf_counter()
        try:
            out = self.bank.forward(request.layer, list(request.experts), list(request.counts),
                                    self.staging.to_device(hidden, self.bank.device))
        except ExpertNotHosted as error:
            raise CallFailed(grpc.StatusCode.NOT_FOUND, f"layer {request.layer}: {error.args[0]}") from None
        out = self.staging.to_host(out.to(hidden.dtype))
        elapsed = time.perf_counter() - start
        with self._stats_lock:
            self.compute_s += elapsed
            self.tokens.update({(request.layer, e): c for e, c in zip(request.experts, request.counts)})
        return out[:-1] if self.malformed_replies else out, elapsed

    def counters(self) -> tuple[dict[tuple[int, int], int], float]:
        """(tokens per (layer, expert), compute seconds) served so far."""
        with self._stats_lock:
            return dict(self.tokens), self.compute_s


def _check_groups(request, shape) -> None:
    if len(request.experts) != len(request.counts):
        raise ValueError(f"{len(request.experts)} experts but {len(request.counts)} counts")
    if len(shape) != 2 or sum(request.counts) != shape[0]:
        raise ValueError(f"hidden of shape {tuple(shape)} does not hold {sum(request.counts)} rows")


class ExpertServer:
    """A bank served at `address` (gRPC, to callers that send `key`) and at its Unix socket (to processes of this
    user); `host` is the address routers are given."""

    def __init__(self, bank: ExpertBank, key: str, host: str = "localhost", port: int = 0, threads: int = 8,
                 limits: FrameLimits = DEFAULT_LIMITS):
        self.servicer = ExpertServicer(bank)
        pool = futures.ThreadPoolExecutor(max_workers=threads, initializer=use_process_threads)
        self.grpc = grpc.server(pool, options=message_size(limits) + WORKER_KEEPALIVE, interceptors=[RequireKey(key)])
        expert_pb2_grpc.add_ExpertServicer_to_server(self.servicer, self.grpc)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        self.address = f"{host}:{self.grpc.add_insecure_port(f'{host}:{port}')}"  # the node's address only
        self.grpc.start()
        on_gpu = bank.device.type == "cuda"  # rows received straight into pinned memory, then one DMA
        self.unix = UnixServer(self.servicer.forward, self.address, limits,
                               self.servicer.staging.received_bytes if on_gpu else None)
        health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        self.unix.stop()
        self.grpc.stop(grace)
