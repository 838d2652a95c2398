"""Chunked prefill, the KV-cache budget with preemption, and prefix caching: the engine's tokens and logprobs stay
transformers' for every family, whatever the schedule."""

import pytest
import torch
from transformers import AutoTokenizer

from cluster.engine.engine import Engine
from cluster.engine.prefix_cache import PrefixCache
from cluster.engine.sequence import SamplingParams, Sequence
from cluster.demo_model import init_model
from experts.families import ARCHS
from router.local import LocalExperts
from router.model import load_dense_model
from tests.reference import attach, greedy, transformers_model

LONG = list(range(3, 60))  # a prompt prefilled over many chunks
SHORT = [7, 9, 11, 13]


def greedy_past_eos(model, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy tokens going on past end-of-sequence, as `ignore_eos` does."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def engine_for(path, **options) -> Engine:
    model = load_dense_model(path, "float32")
    attach(model, path, 2, LocalExperts)
    return Engine(model, AutoTokenizer.from_pretrained(path), model.config.max_position_embeddings,
                  background=False, **options)


class Collected:
    """Every event of one sequence, and the engine step each token came at."""

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams):
        self.tokens, self.steps, self.events = [], [], []
        self.engine = engine
        engine.submit(Sequence(prompt, params, self._add))

    def _add(self, event):
        self.events.append(event)
        self.tokens += event.token_ids
        self.steps += [self.engine.steps] * len(event.token_ids)


def run(engine: Engine, start: int = 0) -> None:
    engine.steps = start
    while engine.step():
        engine.steps += 1


@pytest.mark.parametrize("arch", ARCHS)
def test_a_long_prompt_in_chunks_beside_a_decoding_stream_is_transformers(checkpoints, arch):
    engine = engine_for(checkpoints[arch], prefill_chunk_tokens=8)
    oracle = transformers_model(checkpoints[arch])
    engine.steps = 0
    running = Collected(engine, SHORT, SamplingParams(max_tokens=16, ignore_eos=True))
    engine.step()
    long = Collected(engine, LONG, SamplingParams(max_tokens=4, ignore_eos=True, logprobs=0, prompt_logprobs=0))
    run(engine, start=1)
    assert running.tokens == greedy(oracle, SHORT, 16) and long.tokens == greedy(oracle, LONG, 4)
    chunks = -(-len(LONG) // 8)
    assert long.steps[0] == chunks  # its prefill took a step per chunk ...
    assert running.steps[:chunks + 1] == list(range(chunks + 1))  # ... and the stream got a token at every one
    with torch.no_grad():
        want = torch.log_softmax(oracle(torch.tensor([LONG])).logits[0], -1)
    scored = long.events[0].prompt_logprobs
    assert [lp.logprob for lp in scored[1:]] == pytest.approx(
        [float(want[i, t]) for i, t in enumerate(LONG[1:])], abs=1e-4)


def oracle_logprobs(oracle, ids: list[int]) -> torch.Tensor:
    """[L, V]: transformers' log-probabilities of the next token at each position of `ids`."""
    with torch.no_grad():
        return torch.log_softmax(oracle(torch.tensor([ids])).logits[0], -1)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_a_sliding_window_holds_in_the_batch_and_across_chunks(tmp_path, arch):
    path = init_model(tmp_path / arch, arch, seed=0, sliding_window=6)
    engine, oracle = engine_for(path, prefill_chunk_tokens=8), transformers_model(path)
    running = Collected(engine, SHORT, SamplingParams(max_tokens=16, ignore_eos=True, logprobs=0))
    engine.step()
    long = Collected(engine, LONG, SamplingParams(max_tokens=1, prompt_logprobs=0))
    run(engine, start=1)
    want = oracle_logprobs(oracle, SHORT + running.tokens)[len(SHORT) - 1:-1]
    assert [lp.logprob for e in running.events for lp in e.logprobs] == pytest.approx(
        [float(row[t]) for row, t in zip(want, running.tokens)], abs=1e-4)
    want = oracle_logprobs(oracle, LONG)
    assert [lp.logprob for lp in long.events[0].prompt_logprobs[1:]] == pytest.approx(
        [float(want[i, t]) for i, t in enumerate(LONG[1:])], abs=1e-4)


def test_a_budget_too_small_for_every_sequence_preempts_and_all_finish_exactly(checkpoints):
    engine = engine_for(checkpoints["mixtral"], kv_cache_tokens=48)
    oracle = transformers_model(checkpoints["mixtral"])
    prompts = [[5 + i, 17, 42, 8 + i] for i in range(4)]
    runs = [Collected(engine, p, SamplingParams(max_tokens=14, ignore_eos=True)) for p in prompts]
    run(engine)
    assert engine.preemptions > 0
    assert [r.tokens for r in runs] == [greedy_past_eos(oracle, p, 14) for p in prompts]
    assert engine.cache_positions() == 0


def test_a_prompt_larger_than_the_budget_is_refused(checkpoints):
    from cluster.errors import InvalidRequest

    engine = engine_for(checkpoints["mixtral"], kv_cache_tokens=16)
    with pytest.raises(InvalidRequest, match="kv_cache_tokens"):
        engine.submit(Sequence(LONG, SamplingParams(max_tokens=1), lambda event: None))


@pytest.mark.parametrize("arch", ARCHS)
def test_a_shared_prefix_is_computed_once_and_changes_nothing(checkpoints, arch):
    engine = engine_for(checkpoints[arch], prefix_cache_tokens=1024, prefill_chunk_tokens=16)
    oracle = transformers_model(checkpoints[arch])
    first, second = LONG + [3, 4, 5], LONG + [9, 8]
    one = Collected(engine, first, SamplingParams(max_tokens=6, ignore_eos=True, logprobs=1))
    run(engine)
    two = Collected(engine, second, SamplingParams(max_tokens=6, ignore_eos=True, logprobs=1))
    run(engine)
    assert engine.prefix_cache.found == 48  # whole blocks of 16 of the shared prefix
    assert one.tokens == greedy(oracle, first, 6) and two.tokens == greedy(oracle, second, 6)
    alone = engine_for(checkpoints[arch])
    three = Collected(alone, second, SamplingParams(max_tokens=6, ignore_eos=True, logprobs=1))
    run(alone)
    assert [lp.logprob for e in two.events for lp in e.logprobs] == pytest.approx(
        [lp.logprob for e in three.events for lp in e.logprobs], abs=1e-5)


def test_a_change_of_routing_forgets_the_cached_prefixes(checkpoints):
    engine = engine_for(checkpoints["mixtral"], prefix_cache_tokens=1024)
    Collected(engine, LONG, SamplingParams(max_tokens=1))
    run(engine)
    assert engine.prefix_cache.size == 48
    engine.schedule(None, None, 1024)
    assert engine.prefix_cache.size == 48
    asked = engine.prefix_cache.asked
    engine.schedule(None, None, 1024, forget_prefixes=True)
    assert engine.prefix_cache.size == 0 and engine.prefix_cache.asked == asked  # counters stay monotonic


def kv(length: int, fill: float):
    return [(torch.full((1, 2, length, 4), fill), torch.full((1, 2, length, 4), -fill))]


def test_the_prefix_cache_finds_the_longest_whole_block_prefix():
    cache = PrefixCache(capacity=64, block=4)
    cache.insert(list(range(10)), kv(10, 1.0))  # keeps 8 positions: two blocks
    length, found = cache.lookup(list(range(8)) + [99])
    assert length == 8 and found[0][0].shape == (1, 2, 8, 4) and float(found[0][1][0, 0, 0, 0]) == -1.0
    assert cache.lookup(list(range(8)))[0] == 4  # the last token is always computed
    assert cache.lookup([0, 1, 2, 9, 4])[0] == 0
    assert (cache.asked, cache.found) == (9 + 8 + 5, 12)


def test_the_prefix_cache_evicts_the_least_recently_used_within_capacity():
    cache = PrefixCache(capacity=8, block=4)
    cache.insert([1, 2, 3, 4, 5], kv(5, 1.0))
    cache.insert([6, 7, 8, 9, 10], kv(5, 2.0))
    cache.lookup([1, 2, 3, 4, 0])  # the first is now the most recent
    cache.insert([11, 12, 13, 14, 15], kv(5, 3.0))
    assert cache.size == 8
    assert cache.lookup([1, 2, 3, 4, 0])[0] == 4 and cache.lookup([6, 7, 8, 9, 0])[0] == 0
    cache.insert(list(range(20)), kv(20, 4.0))  # larger than the whole cache: not kept
    assert cache.size == 8
