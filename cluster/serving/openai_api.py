"""OpenAI-compatible completions: request and response shapes."""

import itertools
import time
import uuid

from pydantic import BaseModel, ConfigDict, model_validator

from cluster.engine.sequence import Event, TokenLogprob

# Fields this server does not implement, with the values that ask for nothing: any other value is refused by
# name, never silently ignored.
NOT_IMPLEMENTED = {"best_of": (None, 1), "suffix": (None, "")}


def refuse_unimplemented(request: BaseModel, neutral: dict[str, tuple]) -> None:
    """ValueError naming every field of `request` set to anything but one of its `neutral` values."""
    asked = [name for name, values in neutral.items() if getattr(request, name) not in values]
    if asked:
        raise ValueError(f"{', '.join(asked)}: not supported by this server")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: each chunk also carries its choice's usage so far


class SamplingFields(BaseModel):
    """The fields both APIs share: OpenAI's, and the extensions (vLLM's names) that benchmark tools send. None
    asks for the neutral value; the ranges are checked by `requests.parse_sampling`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end user's id, for the caller's own records: it changes nothing here
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    ignore_eos: bool = False
    min_tokens: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self) -> dict:
        """parse_sampling's fields, but for max_tokens, logprobs and echo, which the APIs name differently."""
        return dict(temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=self.stop_list(),
                    ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, top_k=self.top_k, min_p=self.min_p,
                    repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                    frequency_penalty=self.frequency_penalty, logit_bias=self.logit_bias)

    def usage_in_stream(self) -> tuple[bool, bool]:
        """(usage at the end, usage in every chunk) of a streamed reply."""
        options = self.stream_options or StreamOptions()
        return options.include_usage, options.continuous_usage_stats


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    echo: bool = False
    logprobs: int | None = None
    add_special_tokens: bool = False  # vLLM's: the tokenizer's BOS and the like around a text prompt
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _refuse_what_is_not_implemented(self):
        refuse_unimplemented(self, NOT_IMPLEMENTED)
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: text or token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion_body(cid: str, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    body = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    return body if usage is None else {**body, "usage": usage}


def completion_choice(index: int, text: str, token_ids: list[int], finish: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "token_ids": token_ids, "logprobs": logprobs, "finish_reason": finish}


def echoed(event: Event, echo: str | None, with_logprobs: bool) -> tuple[str, list[TokenLogprob] | None]:
    """A choice's text and token logprobs from `event`, led by the prompt's when `echo` (the prompt's text) is set
    and `event` is the choice's first."""
    logprobs = (event.logprobs or []) if with_logprobs else None
    if echo is None:
        return event.text, logprobs
    return echo + event.text, None if logprobs is None else (event.prompt_logprobs or []) + logprobs


def completion_logprobs(tokenizer, logprobs: list | None, text_offset: int = 0) -> dict | None:
    """The completions API's logprobs of `logprobs` (TokenLogprob), whose text starts at `text_offset`; a prompt's
    first token has no logprob and no alternatives (null)."""
    if logprobs is None:
        return None
    tokens = tokenizer.batch_decode([[lp.token_id] for lp in logprobs])
    offsets = list(itertools.accumulate(map(len, tokens), initial=text_offset))[:len(tokens)]
    texts = iter(tokenizer.batch_decode([[t] for lp in logprobs for t, _ in lp.top]))  # every alternative at once
    top = [None if lp.logprob is None else {next(texts): v for _, v in lp.top} for lp in logprobs]
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs], "top_logprobs": top,
            "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, status: int, code: str | int | None = None) -> dict:
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": status if code is None else code}}


def validation_message(errors: list[dict]) -> str:
    """Pydantic's errors as one line, each naming its field: "best_of: not supported by this server"."""
    parts = []
    for error in errors:
        field = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{field}: {message}" if field else message)
    return "; ".join(parts)
