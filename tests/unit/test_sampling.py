"""Sampling with every field the APIs take, against transformers' own generate with the same processors:
greedy and seeded draws, token for token."""

import pytest
import torch

from cluster.engine.sampling import OutputPenalties
from cluster.engine.sequence import SamplingParams
from tests.unit.test_models import engine_and_oracle

PROMPT = [5, 17, 42, 17, 99, 5, 5]


@pytest.fixture(scope="module")
def engine_oracle(checkpoints):
    return engine_and_oracle(checkpoints["mixtral"])


def served(engine, params: SamplingParams) -> list[int]:
    return [t for event in engine.stream(PROMPT, params) for t in event.token_ids]


def generated(oracle, max_new_tokens: int, seed: int | None = None, **options) -> list[int]:
    ids = torch.tensor([PROMPT])
    if seed is not None:
        torch.manual_seed(seed)
    out = oracle.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          do_sample=seed is not None, pad_token_id=0, **options)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("fields, options", [
    (dict(repetition_penalty=1.5), dict(repetition_penalty=1.5)),
    (dict(repetition_penalty=0.7), dict(repetition_penalty=0.7)),
    (dict(logit_bias=((17, 5.0), (3, -100.0))), dict(sequence_bias=[[[17], 5.0], [[3], -100.0]])),
])
def test_greedy_with_penalties_and_bias_is_transformers(engine_oracle, fields, options):
    engine, oracle = engine_oracle
    assert served(engine, SamplingParams(max_tokens=12, temperature=0, **fields)) == generated(oracle, 12, **options)


def test_min_tokens_holds_back_the_end_of_sequence(engine_oracle):
    engine, oracle = engine_oracle
    eos = oracle.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    push = ((eos, 100.0),)  # the end of sequence as soon as it may come
    assert served(engine, SamplingParams(max_tokens=12, temperature=0, logit_bias=push)) == [eos]
    tokens = served(engine, SamplingParams(max_tokens=12, temperature=0, logit_bias=push, min_tokens=5))
    assert len(tokens) == 6 and tokens[-1] == eos
    assert tokens == generated(oracle, 12, sequence_bias=[[[eos], 100.0]], min_new_tokens=5)


@pytest.mark.parametrize("fields", [
    dict(temperature=0.8),
    dict(temperature=1.3, top_k=20),
    dict(temperature=0.9, top_p=0.8),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.7, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.2),
])
def test_seeded_draws_are_transformers(engine_oracle, fields):
    engine, oracle = engine_oracle
    options = {**fields, "top_k": fields.get("top_k", 0)}  # transformers' own default is 50
    assert served(engine, SamplingParams(max_tokens=10, seed=11, **fields)) == generated(oracle, 10, seed=11,
                                                                                      **options)


def test_output_penalties_count_only_generated_tokens():
    scores = torch.zeros(1, 6)
    ids = torch.tensor([[1, 1, 2, 3, 3, 3]])  # the prompt is [1, 1]
    out = OutputPenalties(presence=0.5, frequency=0.25, prompt_len=2)(ids, scores)
    assert out.tolist() == [[0.0, 0.0, -0.75, -1.25, 0.0, 0.0]]
