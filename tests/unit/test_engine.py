"""The continuous-batching engine, with in-process expert banks, against transformers' generate."""

import queue

import pytest
from transformers import AutoTokenizer

from cluster.engine import Engine, SamplingParams, Sequence
from router.local import LocalExperts
from router.model import load_dense_model
from tests.reference import attach, greedy, transformers_model

PROMPTS = ["Hello, world", "The quick brown fox jumps over the lazy dog.", "Mixture"]


@pytest.fixture(scope="module", params=[1, 2], ids=["one-lane", "ping-pong"])
def engine(checkpoints, request):
    path = checkpoints["mixtral"]
    model = load_dense_model(path, "float32")
    attach(model, path, 2, LocalExperts)
    return Engine(model, AutoTokenizer.from_pretrained(path), context_len=model.config.max_position_embeddings,
                  lanes=request.param)


def run(engine, prompt_ids, params):
    events = queue.Queue()
    engine.submit(Sequence(prompt_ids, params, events.put))
    out = []
    while not out or not out[-1].finish_reason:
        event = events.get(timeout=60)
        assert event.error is None, event.error
        out.append(event)
    return out


def test_sequences_joining_a_running_batch_decode_like_generate(engine, checkpoints):
    tokenizer, oracle = engine.tokenizer, transformers_model(checkpoints["mixtral"])
    streams = [queue.Queue() for _ in PROMPTS]
    for prompt, stream in zip(PROMPTS, streams):
        engine.submit(Sequence(tokenizer.encode(prompt), SamplingParams(max_tokens=16), stream.put))
    for prompt, stream in zip(PROMPTS, streams):
        tokens = []
        while True:
            event = stream.get(timeout=60)
            tokens += event.token_ids
            if event.finish_reason:
                break
        assert tokens == greedy(oracle, tokenizer.encode(prompt), 16)


def test_stop_string_ends_with_stop_and_is_not_sent(engine):
    ids = engine.tokenizer.encode("Hello, world")
    free = "".join(e.text for e in run(engine, ids, SamplingParams(max_tokens=12)))
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    events = run(engine, ids, SamplingParams(max_tokens=12, stop=(stop,)))
    text = "".join(e.text for e in events)
    assert events[-1].finish_reason == "stop"
    assert stop not in text and free.startswith(text)


def test_seeded_sampling_repeats(engine):
    ids = engine.tokenizer.encode("Hello")
    params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    first = [t for e in run(engine, ids, params) for t in e.token_ids]
    assert first == [t for e in run(engine, ids, params) for t in e.token_ids]
