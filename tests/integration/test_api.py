"""The public APIs of one served checkpoint: HTTP and gRPC agree, stream, batch, and refuse bad input."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
import ray
from ray import serve
from transformers import AutoTokenizer

from tests.integration.conftest import deploy, generate, tokens
from tests.reference import greedy, transformers_model

APP = "api"


@pytest.fixture(scope="module")
def app(checkpoints, serve_endpoints):
    deploy(APP, checkpoints["mixtral"], num_workers=2)
    yield f"{serve_endpoints[0]}/{APP}"
    serve.delete(APP)


@pytest.fixture(scope="module")
def tokenizer(checkpoints):
    return AutoTokenizer.from_pretrained(checkpoints["mixtral"])


def test_http_and_grpc_give_the_same_tokens(app, inference_stub):
    request = dict(prompt="Hello, world", max_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    body = httpx.post(f"{app}/v1/completions", json=request, timeout=60).json()
    responses = generate(inference_stub, APP, **request)
    assert body["choices"][0]["token_ids"] == tokens(responses)
    assert body["choices"][0]["text"] == "".join(r.text for r in responses)
    assert body["choices"][0]["finish_reason"] == responses[-1].finish_reason


def test_prompt_as_token_ids_and_models_route(app, inference_stub, tokenizer):
    ids = tokenizer.encode("Pack my box")
    body = httpx.post(f"{app}/v1/completions", json=dict(prompt=ids, max_tokens=5, temperature=0), timeout=60).json()
    assert body["choices"][0]["token_ids"] == tokens(generate(inference_stub, APP, prompt="Pack my box", max_tokens=5,
                                                              temperature=0))
    assert httpx.get(f"{app}/v1/models").json()["data"][0]["id"] == APP


def test_streams_deliver_tokens_as_they_come(app, inference_stub):
    started, arrivals = time.perf_counter(), []
    request = dict(prompt="Hello", max_tokens=48, temperature=0, stop=[])
    from protos import inference_pb2

    for response in inference_stub.Generate(inference_pb2.GenerateRequest(**request), timeout=60,
                                            metadata=[("application", APP)]):
        arrivals.append((time.perf_counter() - started, len(response.token_ids)))
    assert [n for _, n in arrivals] == [1] * len(arrivals)
    assert arrivals[0][0] < arrivals[-1][0] / 2  # the first token came long before the last

    chunks = []
    with httpx.stream("POST", f"{app}/v1/completions", json={**request, "stream": True}, timeout=60) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:])["choices"][0])
    assert len(chunks) == len(arrivals)
    assert chunks[-1]["finish_reason"] == "length"


def test_sixteen_concurrent_requests_complete_correctly(app, inference_stub, checkpoints, tokenizer):
    oracle = transformers_model(checkpoints["mixtral"])
    prompts = [f"request {i}: the quick brown fox" for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        served = list(pool.map(lambda p: generate(inference_stub, APP, prompt=p, max_tokens=10, temperature=0), prompts))
    for prompt, responses in zip(prompts, served):
        assert tokens(responses) == greedy(oracle, tokenizer.encode(prompt), 10)


BAD = [
    (dict(prompt_token_ids=[1, 10**6]), "outside the vocabulary"),
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="hi", max_tokens=0), "max_tokens"),
    (dict(prompt="hi", max_tokens=10**6), "max_tokens"),
    (dict(prompt_token_ids=[5] * 2000), "the context holds"),
    (dict(prompt="hi", temperature=-1), "temperature"),
]


@pytest.mark.parametrize("fields, message", BAD)
def test_bad_input_gets_invalid_argument_then_serving_goes_on(app, inference_stub, fields, message):
    with pytest.raises(grpc.RpcError) as info:
        generate(inference_stub, APP, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()
    body = {("prompt" if k == "prompt_token_ids" else k): v for k, v in fields.items()}
    reply = httpx.post(f"{app}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 400 and message in reply.json()["error"]["message"]
    assert tokens(generate(inference_stub, APP, prompt="still serving", max_tokens=3))


def test_malformed_http_body_is_400(app):
    assert httpx.post(f"{app}/v1/completions", json={"max_tokens": 3}, timeout=60).status_code == 400


def test_lost_expert_worker_fails_requests_with_unavailable(app, inference_stub):
    from cluster.control.workers import NAMESPACE, worker_name

    ray.kill(ray.get_actor(worker_name(APP, 1), namespace=NAMESPACE))
    with pytest.raises(grpc.RpcError) as info:
        generate(inference_stub, APP, prompt="Hello", max_tokens=4, timeout=60)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "expert worker" in info.value.details()
    assert "has no live replica" in info.value.details()

    deadline = time.monotonic() + 120  # the controller replaces the worker, and serving recovers
    while True:
        try:
            assert tokens(generate(inference_stub, APP, prompt="Hello", max_tokens=4, timeout=60))
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, "serving did not recover after the worker was replaced"
            time.sleep(1)
