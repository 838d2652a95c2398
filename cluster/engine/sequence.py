"""A request as the engine sees it: its prompt, how to sample it, and what it has generated so far."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cluster.engine.detokenize import IncrementalText

if TYPE_CHECKING:
    from transformers import DynamicCache

    from cluster.engine.sampling import Sampler


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
    top_k: int = 0  # 0: every token
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # as transformers and vLLM define it: over the prompt's and generated tokens
    presence_penalty: float = 0.0  # as OpenAI defines them: over the generated tokens
    frequency_penalty: float = 0.0
    min_tokens: int = 0  # end-of-sequence is held back until this many tokens are generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)


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
    sampler: "Sampler | None" = None  # set by the engine that admits it
    cache: "DynamicCache | None" = None  # its own, while its prompt is prefilled chunk by chunk
    prefilled: int = 0  # positions of `prefill_ids` in `cache`
    prefix_checked: bool = False  # whether the prefix cache was asked for its prompt
    prefix_source: object = None  # the prefix cache current when its chunked prefill began
    scored_rows: list = field(default_factory=list)  # [n, V] logits of each prefilled chunk, when scoring

    @property
    def prefill_ids(self) -> list[int]:
        """What a prefill computes: the prompt, and, for a sequence preempted while decoding, every token it
        generated but the last, which the next decode step takes."""
        return self.prompt_ids + self.generated[:-1]

    @property
    def prefill_len(self) -> int:
        return len(self.prompt_ids) + max(len(self.generated) - 1, 0)

    @property
    def scores_prompt(self) -> bool:
        return self.params.prompt_logprobs is not None and not self.generated

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.generated)
