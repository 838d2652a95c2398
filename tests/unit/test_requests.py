import pytest

from cluster.config import LimitsConfig
from cluster.demo_model import build_tokenizer
from cluster.errors import InvalidRequest
from cluster.serving.requests import check_prompt_count, choice_params, parse_generation, parse_prompt

TOKENIZER = build_tokenizer()


def parse(**fields):
    base = dict(prompt="hi", prompt_ids=None, max_tokens=None, temperature=None, top_p=None, seed=None, stop=None)
    return parse_generation(**{**base, **fields}, tokenizer=TOKENIZER, vocab_size=512, context_len=64,
                            default_max_tokens=16)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt_ids=[1, 512]), "token id 512 is outside the vocabulary"),
        (dict(prompt_ids=[-1]), "token id -1 is outside"),
        (dict(max_tokens=0), "max_tokens must be in"),
        (dict(max_tokens=65), "max_tokens must be in"),
        (dict(prompt_ids=[5] * 64), "the context holds 64"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(prompt="x\ud800y"), "prompt is not valid Unicode text: a lone surrogate at position 1"),
        (dict(stop=["ok", "\udfff"]), "stop is not valid Unicode"),
        (dict(prompt_ids=[5] * 9, limits=LimitsConfig(max_prompt_tokens=8)), "limits.max_prompt_tokens is 8"),
        (dict(max_tokens=9, limits=LimitsConfig(max_tokens=8)), r"max_tokens must be in \[1, 8\] \(limits.max_tokens\)"),
        (dict(max_tokens=-1, echo=True), r"max_tokens must be in \[0, 64\]"),
        (dict(top_k=-2), "top_k must be >= 1, or 0 or -1"),
        (dict(seed=2**64), r"seed must be in \[-2\*\*62, 2\*\*62\]"),
        (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty must be in"),
        (dict(max_tokens=4, min_tokens=5), r"min_tokens must be in \[0, 4\] \(max_tokens\)"),
        (dict(logit_bias={512: 1.0}), "logit_bias: token id 512 is outside the vocabulary"),
        (dict(logit_bias={5: 101.0}), r"logit_bias: the bias of token 5 must be in \[-100, 100\]"),
    ],
)
def test_bad_input_is_named(fields, message):
    with pytest.raises(InvalidRequest, match=message):
        parse(**fields)


def test_defaults_and_token_ids_win_over_text():
    ids, params = parse(prompt="ignored", prompt_ids=[3, 4])
    assert ids == [3, 4] and params.max_tokens == 16 and params.temperature == 1.0 and params.top_p == 1.0


def test_neutral_values_ask_for_nothing():
    _, params = parse(top_k=-1, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                      min_tokens=0, logit_bias={})
    _, unset = parse()
    assert params == unset


def test_prompt_counts_are_checked_against_the_limit():
    check_prompt_count(2, LimitsConfig(max_prompts=2))
    with pytest.raises(InvalidRequest, match="prompt is an empty array"):
        check_prompt_count(0, LimitsConfig())
    with pytest.raises(InvalidRequest, match="prompt has 3 prompts; limits.max_prompts is 2"):
        check_prompt_count(3, LimitsConfig(max_prompts=2))


def test_a_batched_prompt_is_named_by_its_index():
    with pytest.raises(InvalidRequest, match=r"prompt\[1\] is empty"):
        parse_prompt([], name="prompt[1]", tokenizer=TOKENIZER, vocab_size=512, context_len=64)
    assert parse_prompt("hi", tokenizer=TOKENIZER, vocab_size=512, context_len=64) == TOKENIZER.encode(
        "hi", add_special_tokens=False)


def test_echo_scores_the_prompt_and_may_generate_nothing():
    _, params = parse(max_tokens=0, echo=True, logprobs=2)
    assert params.max_tokens == 0 and params.prompt_logprobs == 2 == params.logprobs
    assert parse(logprobs=2)[1].prompt_logprobs is None


def test_choices_are_independent_draws_each_reproducible_with_a_seed():
    _, seeded = parse(seed=7)
    assert [p.seed for p in choice_params(seeded, 3, max_n=4)] == [7, 8, 9]
    _, unseeded = parse()
    assert choice_params(unseeded, 2, max_n=4) == [unseeded, unseeded]
    with pytest.raises(InvalidRequest, match=r"n must be in \[1, 4\] \(limits.max_n\), got 5"):
        choice_params(unseeded, 5, max_n=4)
