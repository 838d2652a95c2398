"""Next-token choice per sequence, with transformers' own logits processors: first what changes which token is
best (logit bias, penalties, min_tokens), then what narrows a draw (temperature, top-k, top-p, min-p), in the
order transformers' `generate` applies them. Greedy at temperature 0.

V = vocabulary, L = the sequence's tokens so far (prompt and generated)
"""

import torch
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from cluster.engine.sequence import SamplingParams, TokenLogprob


class OutputPenalties:
    """OpenAI's presence and frequency penalties, which transformers does not have: each token's logit lowered by
    whether and how often it was generated (the prompt's tokens do not count)."""

    def __init__(self, presence: float, frequency: float, prompt_len: int):
        self.presence, self.frequency, self.prompt_len = presence, frequency, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """input_ids: [1, L]; scores: [1, V]."""
        counts = torch.bincount(input_ids[0, self.prompt_len:], minlength=scores.shape[-1])  # [V]
        return scores - self.frequency * counts - self.presence * (counts > 0)


class Sampler:
    """How one sequence picks its tokens: `params` over a prompt of `prompt_len` tokens, `eos_ids` held back
    until min_tokens are generated."""

    def __init__(self, params: SamplingParams, prompt_len: int, eos_ids: set[int]):
        self.params = params
        self.adjust = _adjusting(params, prompt_len, eos_ids)
        self.narrow = _narrowing(params)
        self.generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)

    def adjusted(self, logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        """logits: [V], the model's after `tokens`; the same with bias and penalties applied."""
        if not self.adjust:
            return logits
        return self.adjust(torch.tensor([tokens]), logits[None])[0]

    def draw(self, logits: torch.Tensor) -> int:
        """logits: [V], adjusted. A token drawn from them narrowed; the most likely at temperature 0."""
        if self.params.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(self.narrow(None, logits[None].float())[0], dim=-1)  # [V]
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _adjusting(p: SamplingParams, prompt_len: int, eos_ids: set[int]) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if p.logit_bias:
        processors.append(SequenceBiasLogitsProcessor([[[token], bias] for token, bias in p.logit_bias]))
    if p.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.presence_penalty or p.frequency_penalty:
        processors.append(OutputPenalties(p.presence_penalty, p.frequency_penalty, prompt_len))
    if p.min_tokens and eos_ids and not p.ignore_eos:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_len, p.min_tokens, sorted(eos_ids)))
    return processors


def _narrowing(p: SamplingParams) -> LogitsProcessorList:
    if p.temperature == 0:
        return LogitsProcessorList()
    warpers = LogitsProcessorList([TemperatureLogitsWarper(p.temperature)])
    if p.top_k:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        warpers.append(MinPLogitsWarper(p.min_p))
    return warpers


def token_logprob(logits: torch.Tensor, token: int, temperature: float, top: int) -> TokenLogprob:
    """logits: [V], adjusted. The log-softmax of the logits `token` was drawn from: the adjusted ones at
    temperature 0, else divided by the temperature (before top-k, top-p and min-p, which only narrow the draw)."""
    logprobs = torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1)  # [V]
    best = logprobs.topk(top) if top else None
    alternatives = tuple(zip(best.indices.tolist(), best.values.tolist())) if best is not None else ()
    return TokenLogprob(token, float(logprobs[token]), alternatives)


def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], top: int) -> list[TokenLogprob]:
    """logits: [L, V], the model's at each of the L prompt positions. Each prompt token's log-probability given
    the tokens before it, with its `top` alternatives; the first token has none."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)  # [L - 1, V]
    chosen = logprobs.gather(1, torch.tensor(prompt_ids[1:], device=logits.device)[:, None])[:, 0].tolist()
    best = logprobs.topk(top) if top else None
    alternatives = ([tuple(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())] if best
                    is not None else [()] * len(chosen))
    return [TokenLogprob(prompt_ids[0], None)] + [
        TokenLogprob(token, logprob, top_) for token, logprob, top_ in zip(prompt_ids[1:], chosen, alternatives)]
