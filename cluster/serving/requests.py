"""A generation request, checked once for both APIs; every problem is an InvalidRequest naming the field."""

import dataclasses
import math

from cluster.engine.sequence import SamplingParams
from cluster.errors import InvalidRequest

MAX_LOGPROBS = 20  # OpenAI's own limit on alternatives per token
SEED_BOUND = 2**62  # a torch generator's seed is 64 bits, and each choice adds its index


def parse_generation(*, prompt: str | None, prompt_ids: list[int] | None, tokenizer, vocab_size: int,
                     context_len: int, limits=None, add_special_tokens: bool = False, **sampling,
                     ) -> tuple[list[int], SamplingParams]:
    """One prompt, as text or token ids (which win), and how to sample it (`sampling`: parse_sampling's fields)."""
    ids = parse_prompt(prompt_ids if prompt_ids else prompt or "", tokenizer=tokenizer, vocab_size=vocab_size,
                       context_len=context_len, limits=limits, add_special_tokens=add_special_tokens)
    return ids, parse_sampling(**sampling, vocab_size=vocab_size, context_len=context_len, limits=limits)


def parse_prompt(prompt: str | list[int], *, name: str = "prompt", tokenizer, vocab_size: int, context_len: int,
                 limits=None, add_special_tokens: bool = False) -> list[int]:
    """A prompt's token ids: `prompt` itself, or its text tokenized. `name`: the field, for messages.
    `limits`: a LimitsConfig, whose max_prompt_tokens narrows what the context allows."""
    if isinstance(prompt, str):
        check_text(name, prompt)
        ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    else:
        ids = list(prompt)
    if not ids:
        raise InvalidRequest(f"{name} is empty: send text or token ids")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})")
    if len(ids) >= context_len:
        raise InvalidRequest(f"{name} has {len(ids)} tokens; the context holds {context_len}, leaving no room to "
                             "generate")
    if limits is not None and limits.max_prompt_tokens is not None and len(ids) > limits.max_prompt_tokens:
        raise InvalidRequest(f"{name} has {len(ids)} tokens; limits.max_prompt_tokens is {limits.max_prompt_tokens}")
    return ids


def parse_sampling(
    *, max_tokens: int | None, temperature: float | None, top_p: float | None, seed: int | None,
    stop: list[str] | None, vocab_size: int, context_len: int, default_max_tokens: int, limits=None,
    ignore_eos: bool = False, logprobs: int | None = None, echo: bool = False, top_k: int | None = None,
    min_p: float | None = None, repetition_penalty: float | None = None, presence_penalty: float | None = None,
    frequency_penalty: float | None = None, min_tokens: int | None = None, logit_bias: dict | None = None,
) -> SamplingParams:
    """How to sample, checked; an unset (None) field asks for its neutral value. With `echo`, the prompt's
    logprobs are scored too, and max_tokens 0 asks for nothing else. `limits`: a LimitsConfig, whose max_tokens
    narrows what the context allows."""
    for text in stop or []:
        check_text("stop", text)
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    least, most, bound = int(not echo), context_len, "the context"
    if limits is not None and limits.max_tokens is not None and limits.max_tokens < context_len:
        most, bound = limits.max_tokens, "limits.max_tokens"
    if not least <= max_tokens <= most:
        raise InvalidRequest(f"max_tokens must be in [{least}, {most}] ({bound}), got {max_tokens}")
    temperature = 1.0 if temperature is None else temperature
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InvalidRequest(f"temperature must be >= 0, got {temperature}")
    top_p = 1.0 if top_p is None else top_p
    if not 0 < top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p}")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise InvalidRequest(f"logprobs must be in [0, {MAX_LOGPROBS}] (alternatives per token), got {logprobs}")
    if seed is not None and not -SEED_BOUND <= seed <= SEED_BOUND:
        raise InvalidRequest(f"seed must be in [-2**62, 2**62], got {seed}")
    return SamplingParams(
        max_tokens, temperature, top_p, seed, tuple(s for s in (stop or []) if s), ignore_eos, logprobs,
        prompt_logprobs=logprobs if echo else None, top_k=_top_k(top_k), min_p=_within("min_p", min_p, 0, 1, 0.0),
        repetition_penalty=_repetition_penalty(repetition_penalty),
        presence_penalty=_within("presence_penalty", presence_penalty, -2, 2, 0.0),
        frequency_penalty=_within("frequency_penalty", frequency_penalty, -2, 2, 0.0),
        min_tokens=_min_tokens(min_tokens, max_tokens), logit_bias=_logit_bias(logit_bias, vocab_size),
    )


def _within(name: str, value: float | None, low: float, high: float, neutral: float) -> float:
    if value is None:
        return neutral
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidRequest(f"{name} must be in [{low}, {high}], got {value}")
    return float(value)


def _top_k(top_k: int | None) -> int:
    """vLLM's convention: 0 or -1 considers every token."""
    if top_k is None or top_k in (0, -1):
        return 0
    if top_k < 1:
        raise InvalidRequest(f"top_k must be >= 1, or 0 or -1 for every token, got {top_k}")
    return top_k


def _repetition_penalty(penalty: float | None) -> float:
    if penalty is None:
        return 1.0
    if not (math.isfinite(penalty) and penalty > 0):
        raise InvalidRequest(f"repetition_penalty must be > 0 (1 changes nothing), got {penalty}")
    return float(penalty)


def _min_tokens(min_tokens: int | None, max_tokens: int) -> int:
    if min_tokens is None:
        return 0
    if not 0 <= min_tokens <= max_tokens:
        raise InvalidRequest(f"min_tokens must be in [0, {max_tokens}] (max_tokens), got {min_tokens}")
    return min_tokens


def _logit_bias(bias: dict | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: token id -> a value in [-100, 100] added to its logit."""
    for token, value in (bias or {}).items():
        if not 0 <= token < vocab_size:
            raise InvalidRequest(f"logit_bias: token id {token} is outside the vocabulary [0, {vocab_size})")
        if not (math.isfinite(value) and -100 <= value <= 100):
            raise InvalidRequest(f"logit_bias: the bias of token {token} must be in [-100, 100], got {value}")
    return tuple(sorted((int(t), float(v)) for t, v in (bias or {}).items()))


def check_prompt_count(count: int, limits) -> None:
    if count == 0:
        raise InvalidRequest("prompt is an empty array: send at least one prompt")
    if limits is not None and count > limits.max_prompts:
        raise InvalidRequest(f"prompt has {count} prompts; limits.max_prompts is {limits.max_prompts}")


def choice_params(params: SamplingParams, n: int, max_n: int) -> list[SamplingParams]:
    """The sampling of each of `n` choices: independent draws, each reproducible when the request has a seed."""
    if not 1 <= n <= max_n:
        raise InvalidRequest(f"n must be in [1, {max_n}] (limits.max_n), got {n}")
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(n)]


def check_text(name: str, text: str) -> None:
    """JSON can carry a lone surrogate ("\\ud800"), which is no text: refuse it rather than fail on it later."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequest(f"{name} is not valid Unicode text: a lone surrogate at position {error.start}") from None
