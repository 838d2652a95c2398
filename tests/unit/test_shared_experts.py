"""A family's shared expert runs inside its layer's routed call, between sending the requests and reading the
replies, whichever order the block calls them in; the logits stay transformers'."""

import pytest
import torch

from router.client import LayerReplies
from router.local import LocalExperts
from router.model import load_dense_model
from router.shared import DeferredShared
from tests.reference import attach, transformers_model


class SentThenCollected(LocalExperts):
    """In-process banks whose replies are read in `collect`, as a worker's are; each step noted in `events`."""

    events: list = []

    def send(self, layer, dispatch, rows, addresses, hedge=None, timeout_s=None):
        SentThenCollected.events.append(("send", layer))
        return self.forward(layer, dispatch, rows, addresses)

    @staticmethod
    def collect(replies: LayerReplies) -> LayerReplies:
        SentThenCollected.events.append(("collect", None))
        return replies


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])  # shared expert first; routed experts first
def test_the_shared_expert_runs_while_the_routed_experts_are_in_flight(checkpoints, arch):
    path = checkpoints[arch]
    model = load_dense_model(path, "float32")
    router = attach(model, path, 2, SentThenCollected)
    assert router.shared and all(isinstance(s, DeferredShared) for s in router.shared.values())
    for layer, shared in router.shared.items():
        shared.inner.register_forward_hook(lambda *_, layer=layer: SentThenCollected.events.append(("shared", layer)))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    SentThenCollected.events = []
    with torch.inference_mode():
        logits = model(ids).logits
    expected = [event for layer in sorted(router.shared) for event in
                (("send", layer), ("shared", layer), ("collect", None))]
    assert SentThenCollected.events == expected
    torch.testing.assert_close(logits, transformers_model(path)(ids).logits, rtol=1e-4, atol=1e-4)
    assert not any(s._owed or s._computed for s in router.shared.values())  # nothing left behind


def test_a_failed_routed_call_leaves_nothing_owed(checkpoints):
    class Failing(LocalExperts):
        def send(self, *args, **kwargs):
            raise ValueError("bad input")

    path = checkpoints["qwen2_moe"]
    model = load_dense_model(path, "float32")
    router = attach(model, path, 2, Failing)
    with pytest.raises(ValueError, match="bad input"), torch.inference_mode():
        model(torch.tensor([[5, 6, 7]]))
    assert not any(s._owed or s._computed for s in router.shared.values())


def test_inputs_that_do_not_match_are_refused_not_answered_empty():
    shared = DeferredShared(torch.nn.Linear(4, 4))
    shared(torch.ones(2, 4))  # the block asks first (Qwen2-MoE's order)
    with pytest.raises(RuntimeError, match="not their shared expert's input"):
        shared.compute(torch.ones(2, 4))
    later = DeferredShared(torch.nn.Linear(4, 4))
    later.compute(torch.ones(2, 4))  # the routed call first (DeepSeek-V3's order)
    with pytest.raises(RuntimeError, match="not its routed experts' input"):
        later(torch.ones(2, 4))


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_a_share_sent_again_after_a_worker_fails_computes_the_shared_expert_once(checkpoints, arch):
    from tests.unit.test_meta_device import FailsOnce

    class FailsOnceAnswersProbes(FailsOnce):
        def probe(self, *args):
            pass  # the ejected worker is back

    path = checkpoints[arch]
    model = load_dense_model(path, "float32")
    router = attach(model, path, 2, FailsOnceAnswersProbes, replicas=2)  # every expert on both: a retry has a place
    computed = []
    for layer, shared in router.shared.items():
        shared.inner.register_forward_hook(lambda *_, layer=layer: computed.append(layer))
    ids = torch.arange(5, 37)[None]  # enough tokens that both workers get a share of the first call
    try:
        with torch.inference_mode():
            logits = model(ids).logits
        assert router.drain_counters()["retries"] > 0
    finally:
        router.close()
    assert computed == sorted(router.shared)
    torch.testing.assert_close(logits, transformers_model(path)(ids).logits, rtol=1e-4, atol=1e-4)
