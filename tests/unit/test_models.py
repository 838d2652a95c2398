"""Each family's routed experts, split over banks, against transformers running the whole model."""

import pytest
import torch

from experts.families import ARCHS
from experts.layout import experts_modules
from router.local import LocalExperts
from router.model import load_dense_model
from tests.reference import attach, transformers_model


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_model_with_expert_banks_equals_transformers(checkpoints, arch):
    full = transformers_model(checkpoints[arch])
    dense = load_dense_model(checkpoints[arch], "float32")
    attach(dense, checkpoints[arch], 3, LocalExperts)
    ids = torch.randint(0, full.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, full(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_serving_side_holds_no_routed_expert_weights(checkpoints, arch):
    dense = load_dense_model(checkpoints[arch])
    for module in experts_modules(dense).values():
        assert list(module.parameters()) == []


def engine_and_oracle(model_dir):
    """An engine stepped by its caller, its experts in two in-process banks, and transformers' whole model."""
    from transformers import AutoTokenizer

    from cluster.engine.engine import Engine

    dense = load_dense_model(model_dir, "float32")
    attach(dense, model_dir, 2, LocalExperts)
    engine = Engine(dense, AutoTokenizer.from_pretrained(model_dir), dense.config.max_position_embeddings,
                    background=False)
    return engine, transformers_model(model_dir)


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_logprobs_are_transformers_log_softmax_for_greedy_decoding(checkpoints, arch):
    from cluster.engine.sequence import SamplingParams

    engine, full = engine_and_oracle(checkpoints[arch])
    prompt = [5, 17, 42, 99]
    events = list(engine.stream(prompt, SamplingParams(max_tokens=5, logprobs=3, ignore_eos=True)))
    got = [lp for event in events for lp in event.logprobs]
    ids = torch.tensor([prompt])
    out = full.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                        do_sample=False, output_logits=True, return_dict_in_generate=True)
    for lp, logits, token in zip(got, out.logits, out.sequences[0, len(prompt):].tolist(), strict=True):
        want = torch.log_softmax(logits[0].float(), -1)
        assert lp.token_id == token and lp.logprob == pytest.approx(float(want[token]), abs=1e-4)
        assert [t for t, _ in lp.top] == want.topk(3).indices.tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logprobs_are_transformers_log_softmax_beside_a_longer_prompt(checkpoints, arch):
    from cluster.engine.sequence import SamplingParams, Sequence, TokenLogprob

    engine, full = engine_and_oracle(checkpoints[arch])
    prompt, longer, events = [5, 17, 42, 99], [7] * 9, []
    engine.submit(Sequence(prompt, SamplingParams(max_tokens=0, prompt_logprobs=2), events.append))
    engine.submit(Sequence(longer, SamplingParams(max_tokens=3), lambda event: None))  # pads `prompt` on the left
    while not events:
        engine.step()
    [event] = events
    assert event.finish_reason == "length" and event.token_ids == [] and event.prompt_logprobs[0] == TokenLogprob(5, None)
    with torch.no_grad():
        want = torch.log_softmax(full(torch.tensor([prompt])).logits[0].float(), -1)  # [L, V]
    for position, lp in enumerate(event.prompt_logprobs[1:]):
        assert lp.token_id == prompt[position + 1]
        assert lp.logprob == pytest.approx(float(want[position, lp.token_id]), abs=1e-4)
        assert [t for t, _ in lp.top] == want[position].topk(2).indices.tolist()
