"""Micro-batches interleaved in one thread: the schedule alone, then an engine's lanes taking turns at each MoE
layer, with the tokens and logprobs of one lane for every family."""

import greenlet
import pytest

from experts.families import ARCHS
from router.local import LocalExperts
from router.pingpong import interleave, pause


def test_tasks_take_turns_from_pause_to_pause():
    order = []

    def task(name, pauses):
        for i in range(pauses):
            order.append((name, i))
            pause()
        return name

    assert interleave([lambda: task("a", 3), lambda: task("b", 1)]) == ["a", "b"]
    assert order == [("a", 0), ("b", 0), ("a", 1), ("a", 2)]


def test_pause_outside_interleave_does_nothing():
    pause()


def test_an_error_is_raised_once_every_task_is_done():
    finished = []

    def fails():
        pause()
        raise ValueError("micro-batch failed")

    def finishes():
        pause()
        pause()
        finished.append(True)

    with pytest.raises(ValueError, match="micro-batch failed"):
        interleave([fails, finishes])
    assert finished == [True]


class Recorded(LocalExperts):
    """In-process banks that note which micro-batch sent each layer call."""

    calls: list = []

    def forward(self, layer, dispatch, rows, addresses, hedge=None, timeout_s=None):
        Recorded.calls.append((id(greenlet.getcurrent()), layer))
        return super().forward(layer, dispatch, rows, addresses)


def engine(model_dir, lanes, client=LocalExperts):
    from transformers import AutoTokenizer

    from cluster.engine.engine import Engine
    from router.model import load_dense_model
    from tests.reference import attach

    dense = load_dense_model(model_dir, "float32")
    attach(dense, model_dir, 2, client)
    return Engine(dense, AutoTokenizer.from_pretrained(model_dir), dense.config.max_position_embeddings,
                  lanes=lanes, background=False)


def test_two_lanes_alternate_at_every_moe_layer(checkpoints):
    from cluster.engine.sequence import SamplingParams

    Recorded.calls = []
    engine(checkpoints["mixtral"], 2, Recorded).generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=3))
    senders = [sender for sender, _ in Recorded.calls]
    layers = max(layer for _, layer in Recorded.calls) + 1
    assert len(set(senders)) >= 2
    # each decode step: A's layer 0, B's layer 0, A's layer 1, ...
    step = Recorded.calls[-2 * layers:]
    assert [layer for _, layer in step] == [layer for layer in range(layers) for _ in range(2)]
    assert all(a != b for (a, _), (b, _) in zip(step[::2], step[1::2]))


@pytest.mark.parametrize("arch", ARCHS)
def test_ping_pong_gives_one_lanes_tokens_and_logprobs(checkpoints, arch):
    from cluster.engine.sequence import SamplingParams, Sequence

    prompts = [[5, 17, 42, 99], [7, 8], [11, 12, 13], [21]]
    params = SamplingParams(max_tokens=6, logprobs=2, ignore_eos=True)

    def run(lanes):
        eng = engine(checkpoints[arch], lanes)
        events = [[] for _ in prompts]
        eng.submit_all([Sequence(ids, params, events[i].append) for i, ids in enumerate(prompts)])
        while not all(e and e[-1].finish_reason for e in events):
            eng.step()
        return [[(lp.token_id, lp.logprob) for event in e for lp in event.logprobs] for e in events]

    one, two = run(1), run(2)
    for a, b in zip(one, two, strict=True):
        assert [t for t, _ in a] == [t for t, _ in b]
        assert [lp for _, lp in a] == pytest.approx([lp for _, lp in b], abs=1e-4)
