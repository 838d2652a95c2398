"""moecluster's requests on vLLM's engine: a choice's SamplingParams as vLLM's, and vLLM's outputs as Events."""

from vllm import SamplingParams as VllmSampling
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind

from cluster.engine.sequence import Event, SamplingParams, TokenLogprob
from cluster.errors import ExpertUnavailable


def vllm_sampling(params: SamplingParams) -> VllmSampling:
    """One choice, streamed as deltas; the fields are the same names with the same meaning."""
    return VllmSampling(
        n=1, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p, seed=params.seed,
        stop=list(params.stop), ignore_eos=params.ignore_eos, logprobs=params.logprobs, top_k=params.top_k or -1,
        min_p=params.min_p, repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, min_tokens=params.min_tokens,
        logit_bias=dict(params.logit_bias) or None, output_kind=RequestOutputKind.DELTA)


def event(output: RequestOutput, alternatives: int | None) -> Event:
    """The tokens new in `output` (a DELTA), with their logprobs and `alternatives` most likely tokens."""
    (choice,) = output.outputs
    logprobs = None
    if alternatives is not None:
        logprobs = [_logprob(token, ranked or {}, alternatives) for token, ranked in
                    zip(choice.token_ids, choice.logprobs or [{}] * len(choice.token_ids))]
    finish = choice.finish_reason if output.finished else None
    if finish == "abort":  # the engine gave the request up: its tokens so far are no answer
        raise ExpertUnavailable("the engine aborted the request")
    return Event(list(choice.token_ids), choice.text, finish, logprobs=logprobs)


def _logprob(token: int, ranked: dict, alternatives: int) -> TokenLogprob:
    top = sorted(((t, lp) for t, lp in ranked.items() if lp.rank is not None), key=lambda item: item[1].rank)
    return TokenLogprob(token, ranked[token].logprob if token in ranked else None,
                        tuple((t, lp.logprob) for t, lp in top[:alternatives]))
