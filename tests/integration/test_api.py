"""The public APIs of one served checkpoint: HTTP and gRPC agree, stream, batch, and refuse bad input."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
import ray
from ray import serve

from tests.integration.conftest import APP, deploy, generate, tokens
from tests.reference import greedy, transformers_model


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
    from cluster.control import ops
    from cluster.control.workers import NAMESPACE, worker_name

    ray.kill(ray.get_actor(worker_name(ops.status(APP)["scope"], 1), namespace=NAMESPACE))
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


def test_a_second_server_on_the_same_ports_is_refused_and_the_first_keeps_serving(app, serve_endpoints, capsys):
    from cluster.cli import main

    http_port, grpc_port = serve_endpoints[0].rsplit(":", 1)[1], serve_endpoints[1].rsplit(":", 1)[1]
    assert main(["serve", "--http-port", http_port, "--grpc-port", grpc_port]) == 2
    assert f"port {http_port} is in use" in capsys.readouterr().err
    body = httpx.post(f"{app}/v1/completions", json=dict(prompt="Hello", max_tokens=2), timeout=60)
    assert body.status_code == 200


def test_the_openai_client_completes_and_lists_the_served_model(client, app, inference_stub):
    completion = client.completions.create(model=APP, prompt="Hello, world", max_tokens=6, temperature=0)
    want = tokens(generate(inference_stub, APP, prompt="Hello, world", max_tokens=6, temperature=0))
    assert completion.choices[0].model_extra["token_ids"] == want
    assert completion.usage.completion_tokens == 6 and completion.model == APP
    assert [m.id for m in client.models.list()] == [APP] and client.models.retrieve(APP).id == APP
    assert httpx.get(f"{app}/health").json() == {"status": "ok"}


def test_a_model_not_served_is_404_model_not_found(client):
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4o", prompt="Hello", max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and "gpt-4o" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize("field", [{"n": 0}, {"best_of": 3}, {"logprobs": 21}, {"suffix": "!"},
                                   {"presence_penalty": 3}, {"tools": []}, {"max_token": 3}])
def test_a_field_not_implemented_is_refused_by_name(client, field):
    import openai

    (name,) = field
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=APP, prompt="Hello", max_tokens=2, extra_body=field)
    assert name in info.value.body["message"]


def test_chat_renders_the_checkpoints_template_and_streams_with_usage(client, tokenizer, inference_stub):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    want = generate(inference_stub, APP, prompt=prompt, max_tokens=8, temperature=0, ignore_eos=False)

    reply = client.chat.completions.create(model=APP, messages=messages, max_completion_tokens=8, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "".join(r.text for r in want)
    assert reply.choices[0].finish_reason == want[-1].finish_reason
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    assert reply.usage.completion_tokens == len(tokens(want))

    chunks = list(client.chat.completions.create(model=APP, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_completions_stream_usage_when_asked(client):
    chunks = list(client.completions.create(model=APP, prompt="Hello", max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == []


@pytest.mark.parametrize("field", [{"n": 17}, {"top_logprobs": 2}, {"tools": [{"type": "function"}]},
                                   {"response_format": {"type": "json_object"}}, {"functions": []}])
def test_a_chat_field_not_implemented_is_refused_by_name(client, field):
    import openai

    (name,) = field
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=APP, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       extra_body=field)
    assert name in info.value.body["message"]


def test_metrics_show_requests_latencies_and_expert_load(client, app):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model=APP, prompt="Pack my box", max_tokens=6, temperature=0)
    time.sleep(0.5)  # the report loop adds the experts' tokens every 200 ms
    reply = httpx.get(f"{app}/metrics", timeout=30)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)

    def total(name):
        return sum(s.value for s in samples.get(name, []))

    assert total("moecluster_generation_tokens_total") >= 6 and total("moecluster_prompt_tokens_total") > 0
    assert total("moecluster_time_to_first_token_seconds_count") >= 1
    assert total("moecluster_inter_token_latency_seconds_count") >= 5
    assert total("moecluster_request_success_total") >= 1
    assert "moecluster_num_requests_running" in samples and "moecluster_num_requests_waiting" in samples
    experts = samples["moecluster_expert_tokens_total"]
    assert {"layer", "expert"} <= experts[0].labels.keys() and total("moecluster_expert_tokens_total") > 0
    assert total("moecluster_expert_forward_seconds_count") > 0
    assert all(s.value >= 1 for s in samples["moecluster_expert_load_imbalance"])
    assert all(s.value == 1 for s in samples["moecluster_expert_replicas"])


def test_api_keys_guard_every_route_but_health(checkpoints, serve_endpoints, tmp_path, inference_stub):
    import openai

    from protos import inference_pb2

    name = "keyed"
    keys = tmp_path / "keys"
    keys.write_text("first-key\nsecond-key\n")
    deploy(name, checkpoints["mixtral"], num_workers=1, api_keys_file=str(keys))
    base = f"{serve_endpoints[0]}/{name}"
    try:
        assert httpx.get(f"{base}/health").status_code == 200
        for path in ("/v1/models", "/metrics"):
            reply = httpx.get(f"{base}{path}")
            assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).completions.create(
                model=name, prompt="Hi", max_tokens=2)
        for key in ("first-key", "second-key"):
            client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)
            assert client.completions.create(model=name, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        request = inference_pb2.GenerateRequest(prompt="Hi", max_tokens=2)
        with pytest.raises(grpc.RpcError) as info:
            list(inference_stub.Generate(request, timeout=60, metadata=[("application", name)]))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        replies = inference_stub.Generate(request, timeout=60, metadata=[("application", name),
                                                                        ("authorization", "Bearer first-key")])
        assert len(tokens(replies)) == 2
    finally:
        serve.delete(name)


def test_a_lone_surrogate_is_a_400_naming_the_field(app):
    reply = httpx.post(f"{app}/v1/completions", content=b'{"prompt": "x\\ud800y", "max_tokens": 2}',
                       headers={"content-type": "application/json"}, timeout=60)
    assert reply.status_code == 400 and "lone surrogate" in reply.json()["error"]["message"]


def test_logprobs_of_completions_and_chat_plain_and_streamed(client):
    plain = client.completions.create(model=APP, prompt="Hello, world", max_tokens=6, temperature=0, logprobs=2)
    logprobs = plain.choices[0].logprobs
    assert len(logprobs.token_logprobs) == 6 == len(logprobs.tokens) == len(logprobs.top_logprobs)
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) <= 2 and logprob <= 0 and max(top.values()) == pytest.approx(logprob)  # greedy: the best
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    streamed = [lp for chunk in client.completions.create(model=APP, prompt="Hello, world", max_tokens=6,
                                                          temperature=0, logprobs=2, stream=True)
                for lp in chunk.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(logprobs.token_logprobs)

    messages = [{"role": "user", "content": "Hello, world"}]
    reply = client.chat.completions.create(model=APP, messages=messages, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)
    chunks = client.chat.completions.create(model=APP, messages=messages, max_tokens=5, temperature=0,
                                            logprobs=True, stream=True)
    streamed = [c.logprob for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for c in chunk.choices[0].logprobs.content]
    assert streamed == pytest.approx([c.logprob for c in content])


def test_n_choices_are_independent_and_each_reproducible_with_a_seed(client):
    sampled = dict(model=APP, prompt="Hello, world", max_tokens=8, temperature=1.0, seed=11)
    both = client.completions.create(n=2, **sampled)
    assert [c.index for c in both.choices] == [0, 1] and both.usage.completion_tokens == 16
    for index, choice in enumerate(both.choices):
        alone = client.completions.create(**{**sampled, "seed": 11 + index})
        assert choice.text == alone.choices[0].text
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(n=2, stream=True, **sampled):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == {c.index: c.text for c in both.choices}

    chat = dict(model=APP, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=1.0, seed=3)
    replies = client.chat.completions.create(n=3, **chat)
    assert [c.index for c in replies.choices] == [0, 1, 2]
    alone = client.chat.completions.create(**{**chat, "seed": 5})
    assert replies.choices[2].message.content == alone.choices[0].message.content
    chunks = list(client.chat.completions.create(n=3, stream=True, **chat))
    for index in range(3):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)
        assert text == replies.choices[index].message.content


def test_echo_returns_the_prompt_with_transformers_logprobs(client, checkpoints, tokenizer):
    import torch

    prompt = "Pack my box with five dozen"
    scored = client.completions.create(model=APP, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = scored.choices[0]
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert choice.text == prompt and scored.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    with torch.no_grad():
        want = torch.log_softmax(transformers_model(checkpoints["mixtral"])(torch.tensor([ids])).logits[0], -1)
    assert choice.logprobs.token_logprobs[1:] == pytest.approx([float(want[i, t]) for i, t in enumerate(ids[1:])],
                                                               abs=1e-4)
    assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in ids] and choice.logprobs.text_offset[0] == 0

    plain = client.completions.create(model=APP, prompt=prompt, max_tokens=4, temperature=0)
    echoed = client.completions.create(model=APP, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=0)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    assert len(echoed.choices[0].logprobs.tokens) == len(ids) + 4
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=APP, prompt=prompt, max_tokens=4, temperature=0, echo=True, stream=True))
    assert streamed == echoed.choices[0].text


def test_grpc_generate_returns_logprobs_and_n_choices(inference_stub, client):
    responses = generate(inference_stub, APP, prompt="Hello, world", max_tokens=5, temperature=0, logprobs=2)
    logprobs = [lp for r in responses for lp in r.logprobs]
    want = client.completions.create(model=APP, prompt="Hello, world", max_tokens=5, temperature=0, logprobs=2)
    assert [lp.logprob for lp in logprobs] == pytest.approx(want.choices[0].logprobs.token_logprobs, abs=1e-5)
    assert all(len(lp.top_token_ids) == 2 == len(lp.top_logprobs) for lp in logprobs)

    choices = generate(inference_stub, APP, prompt="Hello", max_tokens=4, temperature=1.0, seed=5, n=2)
    by_index = {i: [t for r in choices if r.index == i for t in r.token_ids] for i in (0, 1)}
    assert by_index[1] == tokens(generate(inference_stub, APP, prompt="Hello", max_tokens=4, temperature=1.0, seed=6))
    assert sum(1 for r in choices if r.finish_reason) == 2


def test_grpc_health_and_reflection_v1_and_v1alpha_on_the_ingress(serve_endpoints, app):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2

    with grpc.insecure_channel(serve_endpoints[1]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        metadata = [("application", APP)]
        for service in ("", "moecluster.v1.Inference"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30, metadata=metadata)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        request = reflection_pb2.ServerReflectionRequest(list_services="")
        for version in ("v1", "v1alpha"):
            call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                         request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                         response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            [reply] = list(call(iter([request]), timeout=30))
            names = {s.name for s in reply.list_services_response.service}
            assert {"moecluster.v1.Inference", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= names


@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x02\xff\xfe"])  # corrupt; a prompt that is no UTF-8
def test_bytes_that_are_no_generate_request_are_invalid_argument(serve_endpoints, app, data):
    with grpc.insecure_channel(serve_endpoints[1]) as channel:
        call = channel.unary_stream("/moecluster.v1.Inference/Generate", request_serializer=lambda raw: raw)
        with pytest.raises(grpc.RpcError) as info:
            list(call(data, timeout=30, metadata=[("application", APP)]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in info.value.details()


def test_limits_name_themselves_and_serving_goes_on(checkpoints, serve_endpoints, inference_stub):
    from protos import inference_pb2, inference_pb2_grpc

    name = "limited"
    deploy(name, checkpoints["mixtral"], num_workers=1, limits=dict(
        max_body_bytes=4096, max_prompt_tokens=8, max_tokens=64, max_n=2, streams_per_connection=2))
    base, metadata = f"{serve_endpoints[0]}/{name}", [("application", name)]
    try:
        for body, limit in [({"prompt": "x" * 5000}, "limits.max_body_bytes"),
                            ({"prompt": [5] * 9}, "limits.max_prompt_tokens"),
                            ({"prompt": "Hi", "max_tokens": 65}, "limits.max_tokens"),
                            ({"prompt": "Hi", "n": 3}, "limits.max_n")]:
            reply = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
            assert reply.status_code == 400 and limit in reply.json()["error"]["message"]
        chunked = httpx.post(f"{base}/v1/completions", content=iter([b'{"prompt": "', b"x" * 5000, b'"}']),
                             headers={"content-type": "application/json"}, timeout=60)
        assert chunked.status_code == 400

        long = inference_pb2.GenerateRequest(prompt="Hi", max_tokens=64, ignore_eos=True, temperature=0)
        held = [inference_stub.Generate(long, timeout=120, metadata=metadata) for _ in range(2)]
        for call in held:
            next(call)  # both streams are open on this connection
        with pytest.raises(grpc.RpcError) as info:
            generate(inference_stub, name, prompt="Hi", max_tokens=2)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limits.streams_per_connection" in info.value.details()
        own_connection = [("grpc.use_local_subchannel_pool", 1)]  # else channels of one process share connections
        with grpc.insecure_channel(serve_endpoints[1], options=own_connection) as other:  # not limited
            assert tokens(generate(inference_pb2_grpc.InferenceStub(other), name, prompt="Hi", max_tokens=2))
        for call in held:
            call.cancel()
        deadline = time.monotonic() + 30  # the cancelled calls give their streams back
        while True:
            try:
                assert tokens(generate(inference_stub, name, prompt="Hi", max_tokens=2))
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.2)
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60).status_code == 200
    finally:
        serve.delete(name)


def test_a_refused_request_logs_one_line_in_the_replica_and_the_proxy(app, inference_stub):
    from pathlib import Path

    marker = 987_654_321  # a max_tokens no other test sends: the refusal quotes it
    with pytest.raises(grpc.RpcError):
        generate(inference_stub, APP, prompt="Hi", max_tokens=marker)
    logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs" / "serve"
    deadline, lines = time.monotonic() + 30, []
    while time.monotonic() < deadline and len({name for name, _ in lines}) < 2:  # Serve's logs flush late
        time.sleep(0.5)
        lines = [(log.name, text.splitlines()[i + 1:i + 2]) for log in logs.glob("*.log")
                 for text in [log.read_text(errors="replace")] for i, line in enumerate(text.splitlines())
                 if f"got {marker}" in line]
    assert {name.split("_")[0] for name, _ in lines} == {"proxy", "replica"}
    assert all(not after or not after[0].startswith("Traceback") for _, after in lines)


def test_hostile_input_on_the_live_server_is_served_or_refused_and_changes_no_token(app, inference_stub,
                                                                                  serve_endpoints):
    import os

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from protos import inference_pb2
    from tests.unit.test_fuzz import chat_bodies, completion_bodies

    live = settings(max_examples=int(os.environ.get("MOECLUSTER_FUZZ_EXAMPLES", "30")), deadline=None,
                    suppress_health_check=list(HealthCheck), database=None)
    before = tokens(generate(inference_stub, APP, prompt="still the same", max_tokens=6, temperature=0))
    answered = {"http": set(), "grpc": set()}

    @live
    @given(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), completion_bodies | chat_bodies)
    def http(route, body):
        reply = httpx.post(f"{app}{route}", content=json.dumps(body), headers={"content-type": "application/json"},
                           timeout=120)  # json.dumps writes NaN and Infinity, which are no JSON: hostile too
        assert reply.status_code in (200, 400, 404), (body, reply.text)
        answered["http"].add(reply.status_code)

    raw = st.binary(max_size=128) | st.builds(
        lambda prompt, ids, max_tokens, n, logprobs: inference_pb2.GenerateRequest(
            prompt=prompt, prompt_token_ids=ids, max_tokens=max_tokens, n=n, logprobs=logprobs).SerializeToString(),
        st.text(max_size=20), st.lists(st.integers(-2**31, 2**31 - 1), max_size=4), st.integers(-2**31, 8),
        st.integers(-2**31, 3), st.integers(-2**31, 30))
    channel = grpc.insecure_channel(serve_endpoints[1])
    stream = channel.unary_stream("/moecluster.v1.Inference/Generate", request_serializer=lambda data: data)

    @live
    @given(raw)
    def grpc_bytes(data):
        try:
            list(stream(data, timeout=120, metadata=[("application", APP)]))
            answered["grpc"].add(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), data
            answered["grpc"].add(error.code())

    with channel:
        http()
        grpc_bytes()
    assert 400 in answered["http"] and grpc.StatusCode.INVALID_ARGUMENT in answered["grpc"]
    assert tokens(generate(inference_stub, APP, prompt="still the same", max_tokens=6, temperature=0)) == before
