"""The continuous-batching engine, with in-process expert banks, against transformers' generate."""

import pytest
from transformers import AutoTokenizer

from cluster.engine.engine import Engine
from cluster.engine.sequence import SamplingParams, Sequence
from router.local import LocalExperts
from router.model import load_dense_model
from tests.reference import attach, greedy, transformers_model

PROMPTS = ["Hello, world", "The quick brown fox jumps over the lazy dog.", "Mixture"]


def make_engine(path, **options):
    model = load_dense_model(path, "float32")
    attach(model, path, 2, LocalExperts)
    return Engine(model, AutoTokenizer.from_pretrained(path), context_len=model.config.max_position_embeddings,
                  **options)


@pytest.fixture(scope="module", params=[1, 2], ids=["one-lane", "ping-pong"])
def engine(checkpoints, request):
    engine = make_engine(checkpoints["mixtral"], lanes=request.param)
    yield engine
    engine.close()


def run(engine, prompt_ids, params):
    return list(engine.stream(prompt_ids, params, timeout_s=60))


def test_batched_sequences_decode_like_generate(engine, checkpoints):
    tokenizer, oracle = engine.tokenizer, transformers_model(checkpoints["mixtral"])
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    outputs = engine.generate(prompts, SamplingParams(max_tokens=16), timeout_s=60)
    assert outputs == [greedy(oracle, ids, 16) for ids in prompts]


def test_a_sequence_joining_a_running_batch_step_by_step(checkpoints):
    engine = make_engine(checkpoints["mixtral"], background=False)
    tokenizer, oracle = engine.tokenizer, transformers_model(checkpoints["mixtral"])
    first, second = (tokenizer.encode(p) for p in PROMPTS[:2])
    got = {0: [], 1: []}
    engine.submit(Sequence(first, SamplingParams(max_tokens=12), lambda e: got[0].extend(e.token_ids)))
    assert engine.step()  # a step is one forward: it prefills what it admits, which makes the first token ...
    assert len(got[0]) == 1
    assert engine.step()  # ... and the next decodes every running sequence
    assert len(got[0]) == 2
    engine.submit(Sequence(second, SamplingParams(max_tokens=12), lambda e: got[1].extend(e.token_ids)))
    while engine.step():
        pass
    assert got[0] == greedy(oracle, first, 12) and got[1] == greedy(oracle, second, 12)
    assert not engine.step()  # nothing left to do


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
