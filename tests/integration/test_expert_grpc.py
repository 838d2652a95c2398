"""MoE layers served by expert workers over real gRPC and over their Unix sockets, against transformers' own
experts block."""

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from experts import service
from experts.families import ARCHS
from experts.layout import experts_modules
from protos.wire.grpc_options import KEY_METADATA
from protos.wire.unix_stream import DEFAULT_LIMITS, FrameLimits
from router.client import ExpertCallError, ExpertClient
from router.model import load_dense_model
from tests.reference import MXFP4, attach, transformers_model

TRANSPORTS = {"grpc": False, "unix": True}
KEY = "the-applications-data-path-key"
WITH_KEY = [(KEY_METADATA, KEY)]


class GrpcWorkers:
    def __init__(self, banks, unix_sockets: bool = False, limits: FrameLimits = DEFAULT_LIMITS):
        self.servers = [service.ExpertServer(bank, KEY, limits=limits) for bank in banks]
        self.addresses = dict(enumerate(server.address for server in self.servers))
        self.client = ExpertClient(timeout_s=30, key=KEY, unix_sockets=unix_sockets)

    def outstanding(self):
        return self.client.outstanding()

    def forward(self, *args):
        return self.client.forward(*args)

    def send(self, *args):
        return self.client.send(*args)

    def collect(self, call):
        return self.client.collect(call)

    def stop(self):
        self.client.close()
        for server in self.servers:
            server.stop(None)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("arch", (*ARCHS, MXFP4))
def test_moe_blocks_match_transformers_within_1e_5(checkpoints, arch, transport):
    full = transformers_model(checkpoints[arch])
    dense = load_dense_model(checkpoints[arch], "float32")
    workers = []
    attach(dense, checkpoints[arch], 2,
           lambda banks: workers.append(GrpcWorkers(banks, TRANSPORTS[transport])) or workers[0])
    try:
        hidden = torch.randn(3, 7, full.config.hidden_size, generator=torch.Generator().manual_seed(0))
        for layer in experts_modules(dense):
            ours, theirs = dense.model.layers[layer].mlp, full.model.layers[layer].mlp
            with torch.no_grad():
                got, want = ours(hidden), theirs(hidden)
            got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    finally:
        workers[0].stop()


def test_a_caller_without_the_applications_key_gets_nothing_from_a_worker(checkpoints):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from experts.bank import ExpertBank
    from protos import expert_pb2, expert_pb2_grpc
    from protos.wire.tensor import to_proto

    workers = GrpcWorkers([ExpertBank(checkpoints["mixtral"], [(0, 0)])])
    channel = grpc.insecure_channel(workers.addresses[0])
    forward = expert_pb2.ExpertForwardRequest(layer=0, experts=[0], counts=[1], hidden=to_proto(torch.zeros(1, 64)))
    calls = {
        "forward": lambda metadata: expert_pb2_grpc.ExpertStub(channel).Forward(forward, timeout=10, metadata=metadata),
        "health": lambda metadata: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                             timeout=10, metadata=metadata),
        "reflection": lambda metadata: list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10, metadata=metadata)),
    }
    try:
        for name, call in calls.items():
            for metadata in ([], [(KEY_METADATA, "a-guess")], [(KEY_METADATA, KEY[:-1])]):
                with pytest.raises(grpc.RpcError) as info:
                    call(metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert call(WITH_KEY), name
    finally:
        channel.close()
        workers.stop()


def test_malformed_forward_is_invalid_argument(checkpoints):
    from experts.bank import ExpertBank
    from protos import expert_pb2, expert_pb2_grpc
    from protos.wire.tensor import to_proto

    workers = GrpcWorkers([ExpertBank(checkpoints["mixtral"], [(0, 0)])])
    stub = expert_pb2_grpc.ExpertStub(grpc.insecure_channel(workers.addresses[0]))
    try:
        bad = [
            expert_pb2.ExpertForwardRequest(layer=0, experts=[0], counts=[3], hidden=to_proto(torch.zeros(2, 64))),
            expert_pb2.ExpertForwardRequest(layer=0, experts=[0, 1], counts=[2], hidden=to_proto(torch.zeros(2, 64))),
            expert_pb2.ExpertForwardRequest(layer=0, experts=[0], counts=[1],
                                            hidden=expert_pb2.Tensor(data=b"x", dtype="float32", shape=[1, 64])),
        ]
        for request in bad:
            with pytest.raises(grpc.RpcError) as info:
                stub.Forward(request, timeout=10, metadata=WITH_KEY)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ok = stub.Forward(expert_pb2.ExpertForwardRequest(layer=0, experts=[0], counts=[2],
                                                          hidden=to_proto(torch.zeros(2, 64))), timeout=10,
                          metadata=WITH_KEY)
        assert list(ok.hidden.shape) == [2, 64]  # the worker goes on serving
    finally:
        workers.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_worker_error_fails_the_call_with_its_status(checkpoints, transport):
    from experts.bank import ExpertBank
    from router.dispatch import plan_dispatch

    workers = GrpcWorkers([ExpertBank(checkpoints["mixtral"], [(0, 0)])], TRANSPORTS[transport])
    try:
        dispatch = plan_dispatch(torch.tensor([[1]]), torch.tensor([[0]]), 8)
        with pytest.raises(ExpertCallError, match="NOT_FOUND") as info:
            workers.forward(0, dispatch, torch.zeros(1, 64), workers.addresses).result()
        assert info.value.status == grpc.StatusCode.NOT_FOUND
        channel = grpc.insecure_channel(workers.addresses[0])
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service.SERVICE_NAME),
                                                          metadata=WITH_KEY)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        workers.stop()


def test_unix_socket_carries_calls_on_the_workers_host(checkpoints):
    from experts.bank import ExpertBank
    from router.dispatch import plan_dispatch

    workers = GrpcWorkers([ExpertBank(checkpoints["mixtral"], [(0, 0)])], unix_sockets=True)
    try:
        dispatch = plan_dispatch(torch.tensor([[0]]), torch.tensor([[0]]), 8)
        want, _ = workers.forward(0, dispatch, torch.ones(1, 64), workers.addresses).result()
        workers.servers[0].grpc.stop(None)  # only the Unix socket is left
        got, _ = workers.forward(0, dispatch, torch.ones(1, 64), workers.addresses).result()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        workers.servers[0].unix.stop()
        with pytest.raises(ExpertCallError) as info:
            workers.forward(0, dispatch, torch.ones(1, 64), workers.addresses).result()
        assert info.value.status == grpc.StatusCode.UNAVAILABLE and info.value.retryable
    finally:
        workers.stop()


def test_a_failed_call_leaves_the_other_workers_streams_in_step(checkpoints):
    from experts.bank import ExpertBank
    from router.dispatch import plan_dispatch

    banks = [ExpertBank(checkpoints["mixtral"], [(0, 0)]), ExpertBank(checkpoints["mixtral"], [(0, 1)])]
    workers = GrpcWorkers(banks, unix_sockets=True)
    try:
        first, second = torch.ones(2, 64), torch.full((2, 64), 2.0)
        with pytest.raises(ExpertCallError, match="NOT_FOUND"):  # worker 0 fails first; worker 1 answers
            workers.forward(0, plan_dispatch(torch.tensor([[5], [1]]), torch.tensor([[0], [1]]), 8), first,
                            workers.addresses).result()
        got, _ = workers.forward(0, plan_dispatch(torch.tensor([[1]]), torch.tensor([[1]]), 8), second[:1],
                                 workers.addresses).result()
        want = banks[1].forward(0, [1], [1], second[:1])
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the answer to this call, not the last one's
    finally:
        workers.stop()


def test_unix_socket_rejects_malformed_frames_and_keeps_serving(checkpoints):
    import socket

    from experts.bank import ExpertBank
    from protos import expert_pb2
    from protos.wire import unix_stream
    from protos.wire.tensor import from_proto, header, raw_bytes

    workers = GrpcWorkers([ExpertBank(checkpoints["mixtral"], [(0, 0)])])
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(unix_stream.socket_name(workers.addresses[0]))
    try:
        rows = torch.zeros(2, 64)
        three = expert_pb2.ExpertForwardRequest(layer=0, experts=[0], counts=[3], hidden=header(rows))
        two = expert_pb2.ExpertForwardRequest(layer=0, experts=[0], counts=[2], hidden=header(rows))
        for message, data in [(b"\xff\xff not a message", b""), (three.SerializeToString(), raw_bytes(rows)),
                              (two.SerializeToString(), b"short")]:
            unix_stream.send(sock, message, data)
            code, details, _ = unix_stream.receive(sock)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details
        unix_stream.send(sock, two.SerializeToString(), raw_bytes(rows))
        code, message, data = unix_stream.receive(sock)
        assert code == grpc.StatusCode.OK
        assert from_proto(expert_pb2.ExpertForwardResponse.FromString(bytes(message)).hidden, data).shape == (2, 64)
    finally:
        sock.close()
        workers.stop()


def test_unix_socket_refuses_a_frame_over_its_configured_limits_and_keeps_serving(checkpoints):
    import socket
    import struct

    from experts.bank import ExpertBank
    from protos.wire import unix_stream
    from router.dispatch import plan_dispatch

    limits = FrameLimits(message_bytes=1 << 16, tensor_bytes=1 << 20)
    workers = GrpcWorkers([ExpertBank(checkpoints["mixtral"], [(0, 0)])], unix_sockets=True, limits=limits)
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(unix_stream.socket_name(workers.addresses[0]))
    sock.settimeout(10)
    try:
        sock.sendall(struct.pack("<IQB", 10, limits.tensor_bytes + 1, 0))  # and never the bytes
        code, details, _ = unix_stream.receive(sock)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and b"limits" in details
        assert sock.recv(1) == b""  # hung up: nothing after that header can be trusted
        dispatch = plan_dispatch(torch.tensor([[0]] * 3), torch.zeros(3, 1, dtype=torch.long), 8)
        out, _ = workers.forward(0, dispatch, torch.randn(3, 64), workers.addresses).result()  # a new connection
        assert out.shape == (3, 64)
    finally:
        sock.close()
        workers.stop()


def test_silent_unix_worker_misses_its_deadline():
    import socket

    from protos.wire import unix_stream
    from router.dispatch import plan_dispatch

    address = "localhost:1"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(unix_stream.socket_name(address))
    listener.listen()  # accepts, never answers
    client = ExpertClient(timeout_s=0.3, key=KEY)
    try:
        dispatch = plan_dispatch(torch.tensor([[0]]), torch.tensor([[0]]), 8)
        with pytest.raises(ExpertCallError) as info:
            client.forward(0, dispatch, torch.ones(1, 64), {0: address}).result()
        assert info.value.status == grpc.StatusCode.DEADLINE_EXCEEDED and info.value.retryable
    finally:
        client.close()
        listener.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_slow_replicas_share_is_hedged_and_the_first_answer_wins(checkpoints, transport):
    import time

    from experts.bank import ExpertBank
    from router.hedge import HedgePolicy
    from router.remote import ExpertRouter
    from router.table import RoutingTable

    banks = [ExpertBank(checkpoints["mixtral"], [(0, 0)]) for _ in range(2)]
    workers = GrpcWorkers(banks, TRANSPORTS[transport])
    table = RoutingTable(1, workers.addresses, {0: [[0, 1]] + [[]] * 7})
    router = ExpertRouter(table, workers.client, hedging=HedgePolicy(min_s=0.02, warmup=4, burst=8))
    hidden = torch.randn(8, 64)
    index, weights = torch.zeros(8, 1, dtype=torch.long), torch.ones(8, 1)
    try:
        want = router.forward(0, hidden, index, weights)
        for _ in range(8):  # the layer's usual call time
            torch.testing.assert_close(router.forward(0, hidden, index, weights), want, rtol=0, atol=0)
        fast = banks[0].forward
        banks[0].forward = lambda *args: (time.sleep(2.0), fast(*args))[1]  # worker 0 turns slow
        started = time.monotonic()
        for _ in range(4):  # calls alternate between the replicas: those to worker 0 are hedged to worker 1
            torch.testing.assert_close(router.forward(0, hidden, index, weights), want, rtol=0, atol=0)
        assert time.monotonic() - started < 2.0
        counters = router.drain_counters()
        assert counters["hedges"] >= 1 and counters["hedges_won"] == counters["hedges"], counters
        assert router.health.ejected() == set()  # slow is not failed
    finally:
        router.close()
        workers.stop()


def test_unix_socket_hangs_up_on_another_user_and_grpc_binds_the_given_host(checkpoints):
    import os
    import shutil
    import subprocess
    import sys

    from experts.bank import ExpertBank
    from protos.wire import unix_stream
    from router.dispatch import plan_dispatch

    python = shutil.which("python3", path="/usr/bin:/bin")  # one another user may run: the venv's may be private
    if sys.platform != "linux" or os.getuid() != 0 or python is None:
        pytest.skip("needs Linux, root to connect as another user, and a system python3")
    workers = GrpcWorkers([ExpertBank(checkpoints["mixtral"], [(0, 0)])], unix_sockets=True)
    probe = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect('\\0' + sys.argv[1]); s.settimeout(10)\n"
             "try:\n    s.sendall(b'x' * 13); print(repr(s.recv(1)))\nexcept OSError as e:\n    print('closed', e)")
    try:
        name = unix_stream.socket_name(workers.addresses[0]).removeprefix("\0")  # argv holds no NUL
        other = subprocess.run([python, "-c", probe, name], check=False, user=65534, capture_output=True, text=True,
                               timeout=60)
        assert other.stdout.strip() in ("b''",) or other.stdout.startswith("closed"), (other.stdout, other.stderr)
        dispatch = plan_dispatch(torch.tensor([[0]]), torch.tensor([[0]]), 8)
        out, _ = workers.forward(0, dispatch, torch.ones(1, 64), workers.addresses).result()  # its own user: served
        assert out.shape == (1, 64)
        assert workers.addresses[0].startswith("localhost:")
    finally:
        workers.stop()


def test_any_unix_socket_frame_is_answered_or_hung_up_on_and_the_worker_serves_on(checkpoints):
    import os
    import socket
    import struct

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from experts.bank import ExpertBank
    from protos.wire import unix_stream
    from router.dispatch import plan_dispatch

    limits = FrameLimits(message_bytes=1 << 16, tensor_bytes=1 << 20)
    workers = GrpcWorkers([ExpertBank(checkpoints["mixtral"], [(0, 0)])], unix_sockets=True, limits=limits)
    dispatch = plan_dispatch(torch.tensor([[0]] * 2), torch.zeros(2, 1, dtype=torch.long), 8)
    rows = torch.randn(2, 64)
    before, _ = workers.forward(0, dispatch, rows, workers.addresses).result()
    frames = st.builds(lambda size, tensor, code, body: struct.pack("<IQB", size, tensor, code) + body,
                       st.integers(0, 2**32 - 1) | st.integers(0, 64), st.integers(0, 2**64 - 1) | st.integers(0, 64),
                       st.integers(0, 255), st.binary(max_size=96))

    @settings(max_examples=int(os.environ.get("MOECLUSTER_FUZZ_EXAMPLES", "100")), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(frames, min_size=1, max_size=3))
    def hostile(sent):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(unix_stream.socket_name(workers.addresses[0]))
            sock.settimeout(0.5)
            sock.sendall(b"".join(sent))
            sock.shutdown(socket.SHUT_WR)  # a frame that announced more bytes than were sent ends here
            try:
                while True:
                    code, _, _ = unix_stream.receive(sock)
                    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OK)
            except (ConnectionError, TimeoutError):  # the worker hung up, or had nothing more to say
                pass

    try:
        hostile()
        after, _ = workers.forward(0, dispatch, rows, workers.addresses).result()
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    finally:
        workers.stop()
