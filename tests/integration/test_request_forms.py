"""What the widely used OpenAI clients and tools send, on a served checkpoint: every prompt form, the sampling
extensions benchmark tools rely on, batched scoring, and clients that go away."""

import json
import threading
import time

import httpx
import pytest
import torch

from protos import inference_pb2
from tests.integration.conftest import APP, generate, tokens
from tests.reference import transformers_model

PROMPTS = ["Hello, world", "Pack my box with five dozen"]
OPTIONS = [
    dict(max_tokens=6, temperature=0),
    dict(max_tokens=5, temperature=1.0, seed=4, n=2),
    dict(max_tokens=4, temperature=0, echo=True, logprobs=2),
    dict(max_tokens=0, echo=True, logprobs=1),
    dict(max_tokens=8, temperature=0, stop=["e"]),
]


def complete(app, **body) -> dict:
    reply = httpx.post(f"{app}/v1/completions", json={"model": APP, **body}, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def chunks(app, path: str = "/v1/completions", **body) -> list[dict]:
    with httpx.stream("POST", f"{app}{path}", json={"model": APP, "stream": True, **body}, timeout=120) as reply:
        assert reply.status_code == 200
        return [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: ")
                and line != "data: [DONE]"]


def same_choice(got: dict, want: dict) -> None:
    assert (got["text"], got["token_ids"], got["finish_reason"]) == (want["text"], want["token_ids"],
                                                                    want["finish_reason"])
    if want["logprobs"] is not None:
        assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
        assert got["logprobs"]["token_logprobs"] == pytest.approx(want["logprobs"]["token_logprobs"], abs=1e-4)


@pytest.mark.parametrize("options", OPTIONS, ids=["greedy", "n-seeded", "echo-logprobs", "scoring", "stop"])
@pytest.mark.parametrize("form", ["strings", "token-arrays"])
def test_a_batch_of_prompts_equals_its_prompts_one_by_one(app, tokenizer, options, form):
    prompts = PROMPTS if form == "strings" else [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    alone = [complete(app, prompt=p, **options) for p in prompts]
    want = [choice for reply in alone for choice in reply["choices"]]  # prompt i's choice j is i * n + j
    batch = complete(app, prompt=prompts, **options)
    assert [c["index"] for c in batch["choices"]] == list(range(len(want)))
    for got, expected in zip(batch["choices"], want):
        same_choice(got, expected)
    assert batch["usage"] == {key: sum(a["usage"][key] for a in alone) for key in batch["usage"]}

    streamed = chunks(app, prompt=prompts, stream_options={"include_usage": True}, **options)
    texts = ["".join(c["choices"][0]["text"] for c in streamed if c["choices"] and c["choices"][0]["index"] == i)
             for i in range(len(want))]
    assert texts == [c["text"] for c in want] and streamed[-1]["usage"] == batch["usage"]


def test_grpc_prompts_equal_their_prompts_one_by_one(app, inference_stub, tokenizer):
    ids = tokenizer.encode(PROMPTS[1], add_special_tokens=False)
    prompts = [inference_pb2.Prompt(text=PROMPTS[0]), inference_pb2.Prompt(token_ids=ids)]
    request = dict(max_tokens=5, temperature=1.0, seed=9, n=2)
    replies = generate(inference_stub, APP, prompts=prompts, **request)
    for i, prompt in enumerate([dict(prompt=PROMPTS[0]), dict(prompt_token_ids=ids)]):
        alone = generate(inference_stub, APP, **prompt, **request)
        for j in range(2):
            assert tokens(r for r in replies if r.index == i * 2 + j) == tokens(r for r in alone if r.index == j)


@pytest.mark.parametrize("fields", [
    {"ignore_eos": True}, {"repetition_penalty": 1.0}, {"min_tokens": 2, "top_k": 5, "add_special_tokens": True},
    {"logit_bias": {}}, {"top_k": -1, "min_p": 0.0, "presence_penalty": None, "best_of": 1, "suffix": None},
])
def test_what_benchmark_tools_send_by_default_is_served(app, fields):
    assert complete(app, prompt="Hello", max_tokens=3, **fields)["usage"]["completion_tokens"] == 3


def test_the_routes_tools_probe_answer_head(app):
    for path in ("/health", "/metrics", "/v1/models", f"/v1/models/{APP}"):
        reply = httpx.head(f"{app}{path}", timeout=30)
        assert reply.status_code == 200 and reply.content == b"", path


def test_the_sampling_extensions_do_what_they_ask(app, inference_stub, checkpoints, tokenizer):
    oracle = transformers_model(checkpoints["mixtral"])
    eos = tokenizer.eos_token_id
    push_eos = {str(eos): 100}
    assert complete(app, prompt="Hello", max_tokens=6, temperature=0, logit_bias=push_eos)["choices"][0][
        "token_ids"] == [eos]
    held = complete(app, prompt="Hello", max_tokens=6, temperature=0, logit_bias=push_eos, min_tokens=3)
    assert len(held["choices"][0]["token_ids"]) == 4 and held["choices"][0]["token_ids"][-1] == eos
    ignored = complete(app, prompt="Hello", max_tokens=6, temperature=0, logit_bias=push_eos, ignore_eos=True)
    assert ignored["choices"][0]["token_ids"] == [eos] * 6 and ignored["choices"][0]["finish_reason"] == "length"

    ids = tokenizer.encode("Hello, world", add_special_tokens=False)
    want = oracle.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, repetition_penalty=1.4,
                           pad_token_id=0)[0, len(ids):].tolist()
    penalized = complete(app, prompt=ids, max_tokens=10, temperature=0, repetition_penalty=1.4)
    assert penalized["choices"][0]["token_ids"] == want
    sampled = dict(max_tokens=8, temperature=0.9, seed=5, top_k=7, min_p=0.05, repetition_penalty=1.2)
    over_http = complete(app, prompt=ids, **sampled)["choices"][0]["token_ids"]
    assert over_http == tokens(generate(inference_stub, APP, prompt_token_ids=ids, **sampled))


def test_usage_in_every_chunk_when_asked(app):
    options = {"stream_options": {"continuous_usage_stats": True}, "max_tokens": 5, "temperature": 0}
    streamed = chunks(app, prompt="Hello", **options)
    assert [c["usage"]["completion_tokens"] for c in streamed] == list(range(1, 6))
    chat = chunks(app, "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}], **options)
    assert [c["usage"]["completion_tokens"] for c in chat] == [0, *range(1, 6)]
    assert len({c["usage"]["prompt_tokens"] for c in chat}) == 1


def test_a_batch_of_scoring_prompts_is_transformers_log_softmax(app, checkpoints):
    oracle = transformers_model(checkpoints["mixtral"])
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, oracle.config.vocab_size, (int(n),), generator=generator).tolist()
               for n in torch.randint(8, 40, (32,), generator=generator)]
    scored = complete(app, prompt=prompts, max_tokens=0, echo=True, logprobs=0)
    for prompt, choice in zip(prompts, scored["choices"]):
        with torch.no_grad():
            want = torch.log_softmax(oracle(torch.tensor([prompt])).logits[0], -1)
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
            [float(want[i, t]) for i, t in enumerate(prompt[1:])], abs=1e-4)


def metric(app, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(httpx.get(f"{app}/metrics", timeout=30).text)
    return sum(s.value for f in families for s in f.samples if s.name == name)


def running(app) -> float:
    return metric(app, "moecluster_num_requests_running")


def test_a_shared_prefix_is_found_in_the_prefix_cache(app, tokenizer):
    shared = tokenizer.encode("You are a helpful assistant. " * 8, add_special_tokens=False)
    found = metric(app, "moecluster_prefix_cache_hits_total")
    first = complete(app, prompt=shared + [5, 6], max_tokens=4, temperature=0)
    second = complete(app, prompt=shared + [5, 6], max_tokens=4, temperature=0)
    assert first["choices"][0]["token_ids"] == second["choices"][0]["token_ids"]
    assert metric(app, "moecluster_prefix_cache_hits_total") - found >= len(shared) // 16 * 16
    assert 0 <= metric(app, "moecluster_kv_cache_usage_perc") <= 1


def seconds_until_idle(app, limit_s: float = 10) -> float:
    started = time.perf_counter()
    while running(app) and time.perf_counter() - started < limit_s:
        time.sleep(0.05)
    return time.perf_counter() - started


LONG = dict(prompt="Hello", max_tokens=400, ignore_eos=True, temperature=0)


def busy_until(app, count: int) -> None:
    deadline = time.perf_counter() + 30
    while running(app) < count:
        assert time.perf_counter() < deadline, "the requests never started"
        time.sleep(0.02)


def test_an_http_client_that_leaves_a_stream_frees_its_slots(app):
    assert seconds_until_idle(app) < 10
    with httpx.stream("POST", f"{app}/v1/completions", json={**LONG, "n": 3, "stream": True}, timeout=60) as reply:
        lines = reply.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        busy_until(app, 3)
    assert seconds_until_idle(app) < 1


def test_an_http_client_that_leaves_a_plain_request_frees_its_slot(app):
    assert seconds_until_idle(app) < 10

    def leave():
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{app}/v1/completions", json={**LONG, "prompt": ["a", "b"]}, timeout=1.5)

    client = threading.Thread(target=leave)
    client.start()
    busy_until(app, 2)
    client.join()
    assert seconds_until_idle(app) < 1


def test_a_grpc_client_that_cancels_frees_its_slot(app, inference_stub):
    assert seconds_until_idle(app) < 10
    call = inference_stub.Generate(inference_pb2.GenerateRequest(**LONG), timeout=60, metadata=[("application", APP)])
    started, tokens = time.perf_counter(), 0
    for reply in call:
        tokens += len(reply.token_ids)
        if tokens >= 40:
            break
    left_s = (LONG["max_tokens"] - tokens) * (time.perf_counter() - started) / tokens  # at this machine's pace now
    busy_until(app, 1)
    call.cancel()
    assert seconds_until_idle(app) < left_s / 2  # freed by the cancel, long before its last token
