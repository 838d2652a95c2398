"""OpenAI-compatible chat completions: request and response shapes, and rendering messages with the
checkpoint's own chat template."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.errors import InvalidRequest
from cluster.serving.openai_api import SamplingFields, refuse_unimplemented, usage
from cluster.serving.requests import check_text

# Fields this server does not implement, with the values that ask for nothing: any other value is refused by name.
NOT_IMPLEMENTED = {"tools": (None, []), "tool_choice": (None, "none"), "response_format": (None, {"type": "text"})}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _refuse_what_is_not_implemented(self):
        refuse_unimplemented(self, NOT_IMPLEMENTED)
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("max_tokens, max_completion_tokens: send one of them")
        return self

    def alternatives(self) -> int | None:
        """Alternatives per token to report: None for no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def render(tokenizer, messages: list[Message]) -> list[int]:
    """The prompt's token ids: the messages through the checkpoint's chat template, then the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this checkpoint has no chat template (tokenizer_config.json has no chat_template): "
                             "use /v1/completions with a prompt")
    plain = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages]
    for i, message in enumerate(plain):
        check_text(f"messages[{i}].content", message["content"])
    text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def chat_logprobs(tokenizer, logprobs: list | None) -> dict | None:
    """The chat API's logprobs of `logprobs` (TokenLogprob): each token with its bytes and its alternatives."""
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}


def chat_body(cid: str, model: str, created: int, choices: list[dict], usage: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage}


def chat_choice(index: int, text: str, token_ids: list[int], finish: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish, "token_ids": token_ids}


def chunk_body(cid: str, model: str, created: int, index: int, delta: dict, finish: str | None,
               token_ids: list[int], logprobs: dict | None = None) -> dict:
    return {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
                     "token_ids": token_ids}],
    }


def usage_chunk(cid: str, model: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last chunk of a stream that asked for `stream_options.include_usage`: no choices, the usage."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
