"""OpenAI-compatible completions: request and response shapes."""

import time
import uuid

from pydantic import BaseModel, ConfigDict


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[int]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion_body(cid: str, model: str, text: str, token_ids: list[int], finish: str | None,
                    prompt_tokens: int | None = None) -> dict:
    body = {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "token_ids": token_ids, "logprobs": None, "finish_reason": finish}],
    }
    if prompt_tokens is not None:
        body["usage"] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(token_ids),
            "total_tokens": prompt_tokens + len(token_ids),
        }
    return body


def error_body(message: str, status: int) -> dict:
    kind = "invalid_request_error" if status == 400 else "server_error"
    return {"error": {"message": message, "type": kind, "code": status}}
