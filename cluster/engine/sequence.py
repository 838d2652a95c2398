"""A request as the engine sees it: its prompt, how to sample it, and what it has generated so far."""

from dataclasses import dataclass, field

import torch

from cluster.engine.detokenize import IncrementalText


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # alternatives reported per token, most likely first; None: no logprobs
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo); None: none


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the distribution it was drawn from, and the `top` most likely
    tokens' (id, log-probability)."""

    token_id: int
    logprob: float | None  # None for a prompt's first token, which nothing predicts
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Event:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    error: Exception | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for them
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token, on the first event, when asked


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    emit: callable
    generated: list[int] = field(default_factory=list)
    sent_chars: int = 0
    cancelled: bool = False
    done: bool = False
    text: IncrementalText | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # scored at prefill, sent with the first event

    def __post_init__(self):
        self.generator = None if self.params.seed is None else torch.Generator().manual_seed(self.params.seed)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.generated)
