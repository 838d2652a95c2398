"""One local Ray cluster and one Serve instance (HTTP + gRPC ingress) for the whole test session."""

import os
import socket
import tempfile

import grpc
import pytest

from protos import inference_pb2_grpc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER_NODES = 3
HEAD = "test-head"  # a resource only the head node has, to keep Serve replicas there


@pytest.fixture(scope="session")
def ray_cluster():
    """A simulated multi-node cluster on this machine: a head for Serve and WORKER_NODES nodes for experts."""
    import ray
    from ray.cluster_utils import Cluster

    from cluster.node_env import apply_node_env

    if not os.environ.get("RAY_TMPDIR"):  # unset or empty: Ray's socket paths must stay short, under /tmp
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray-")
    apply_node_env()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "resources": {HEAD: 4},
                                                                "include_dashboard": False})
    for _ in range(WORKER_NODES):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def serve_endpoints(ray_cluster):
    from ray import serve
    from ray.serve.config import gRPCOptions

    from cluster.serving.grpc_api import SERVICERS

    http_port, grpc_port = _free_port(), _free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=SERVICERS),
    )
    yield f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    serve.shutdown()


@pytest.fixture(scope="session")
def inference_stub(serve_endpoints):
    channel = grpc.insecure_channel(serve_endpoints[1])
    yield inference_pb2_grpc.InferenceStub(channel)
    channel.close()


APP = "api"  # the application of `app`


@pytest.fixture(scope="module")
def app(checkpoints, serve_endpoints):
    """The mixtral checkpoint served on two expert workers, for a module of the API's tests (deleted after it, as
    later modules need the room): its HTTP base URL."""
    from ray import serve

    deploy(APP, checkpoints["mixtral"], num_workers=2)
    yield f"{serve_endpoints[0]}/{APP}"
    serve.delete(APP)


@pytest.fixture(scope="session")
def tokenizer(checkpoints):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoints["mixtral"])


@pytest.fixture(scope="module")
def client(app):
    import openai

    return openai.OpenAI(base_url=f"{app}/v1", api_key="unused", max_retries=0, timeout=60)


def deploy(name: str, model_dir, **config):
    from ray import serve

    from cluster.serving.app import build

    serve.run(build({"model": str(model_dir), "model_name": name, **config}), name=name, route_prefix=f"/{name}")


def generate(stub, app: str, timeout: float = 120, **fields):
    """All GenerateResponse messages of one stream."""
    from protos import inference_pb2

    return list(stub.Generate(inference_pb2.GenerateRequest(**fields), timeout=timeout, metadata=[("application", app)]))


def tokens(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def pytest_terminal_summary(terminalreporter):
    from tests.integration.faults import CHANGES, summary

    for title, lines in (("fault matrix", summary()), ("rollouts under load", CHANGES)):
        if lines:
            terminalreporter.section(title)
            for line in lines:
                terminalreporter.write_line(line)
