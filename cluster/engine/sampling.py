"""Next-token choice per sequence: greedy at temperature 0, else temperature and nucleus (top-p) sampling."""

import torch

from cluster.engine.sequence import TokenLogprob


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """logits: [V] for one sequence."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keeps the first token that crosses top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logits: torch.Tensor, token: int, temperature: float, top: int) -> TokenLogprob:
    """logits: [V]. The log-softmax of the logits `token` was drawn from: the model's own at temperature 0, else
    divided by the temperature (before top-p, which only narrows the draw)."""
    logprobs = torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1)  # [V]
    best = logprobs.topk(top) if top else None
    alternatives = tuple(zip(best.indices.tolist(), best.values.tolist())) if best is not None else ()
    return TokenLogprob(token, float(logprobs[token]), alternatives)


def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], top: int) -> list[TokenLogprob]:
    """logits: [L, V], the model's at each of the L prompt positions. Each prompt token's log-probability given
    the tokens before it, with its `top` alternatives; the first token has none."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)  # [L - 1, V]
    chosen = logprobs.gather(1, torch.tensor(prompt_ids[1:])[:, None])[:, 0].tolist()  # [L - 1]
    best = logprobs.topk(top) if top else None
    alternatives = ([tuple(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())] if best
                    is not None else [()] * len(chosen))
    return [TokenLogprob(prompt_ids[0], None)] + [
        TokenLogprob(token, logprob, top_) for token, logprob, top_ in zip(prompt_ids[1:], chosen, alternatives)]
