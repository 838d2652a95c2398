"""A generation request, checked once for both APIs; every problem is an InvalidRequest naming the field."""

import dataclasses
import math

from cluster.engine.sequence import SamplingParams
from cluster.errors import InvalidRequest

MAX_LOGPROBS = 20  # OpenAI's own limit on alternatives per token


def parse_generation(
    *, prompt: str | None, prompt_ids: list[int] | None, max_tokens: int | None, temperature: float | None,
    top_p: float | None, seed: int | None, stop: list[str] | None, tokenizer, ignore_eos: bool = False, vocab_size: int, context_len: int,
    default_max_tokens: int, logprobs: int | None = None, echo: bool = False, limits=None,
) -> tuple[list[int], SamplingParams]:
    """With `echo`, the prompt's logprobs are scored too, and max_tokens 0 asks for nothing else. `limits`: a
    LimitsConfig, whose max_prompt_tokens and max_tokens narrow what the context allows."""
    for name, text in [("prompt", prompt or ""), *(("stop", s) for s in stop or [])]:
        check_text(name, text)
    ids = list(prompt_ids) if prompt_ids else tokenizer.encode(prompt or "", add_special_tokens=False)
    if not ids:
        raise InvalidRequest("prompt is empty: send prompt text or prompt_token_ids")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")
    if len(ids) >= context_len:
        raise InvalidRequest(f"prompt has {len(ids)} tokens; the context holds {context_len}, leaving no room to generate")
    if limits is not None and limits.max_prompt_tokens is not None and len(ids) > limits.max_prompt_tokens:
        raise InvalidRequest(f"prompt has {len(ids)} tokens; limits.max_prompt_tokens is {limits.max_prompt_tokens}")
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
    stop = tuple(s for s in (stop or []) if s)
    return ids, SamplingParams(max_tokens, temperature, top_p, seed, stop, ignore_eos, logprobs,
                               prompt_logprobs=logprobs if echo else None)


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
