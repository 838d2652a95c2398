"""Outlier detection (eject, back off, probe, readmit) and the router's retry of only a failed worker's share."""

import time

import grpc
import pytest
import torch

from router.client import ExpertCallError, LayerReplies, RepliesAtOnce
from router.health import WorkerHealth
from router.remote import ExpertRouter
from router.replicas import NoReplica
from router.table import RoutingTable


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_backoff_doubles_per_failed_probe_up_to_its_cap_then_readmits():
    clock = Clock()
    health = WorkerHealth(base_s=0.25, max_s=1.0, clock=clock)
    health.eject(3, "DEADLINE_EXCEEDED")
    health.eject(3, "seen twice")  # a second call failing on the same worker is the same ejection
    assert health.ejected() == {3} and health.due() == [] and health.reason(3) == "DEADLINE_EXCEEDED"
    waits = []
    for _ in range(4):
        waits.append(health.next_due_s())
        clock.now += waits[-1]
        assert health.due() == [3]
        health.probed(3, "still silent")
    assert waits == [0.25, 0.5, 1.0, 1.0]
    clock.now += 1.0
    health.probed(3, None)
    assert health.ejected() == set() and health.next_due_s() is None
    assert dict(health.counters) == {"ejections": 1, "probes": 5, "probe_failures": 4, "readmissions": 1}


def test_a_worker_that_fails_again_soon_after_readmission_backs_off_longer():
    clock = Clock()
    health = WorkerHealth(base_s=0.25, max_s=4.0, healthy_s=10.0, clock=clock)
    health.eject(0, "x")
    clock.now += 0.25
    health.probed(0, None)
    health.eject(0, "x")  # flapping: the streak goes on
    assert health.next_due_s() == 0.5
    clock.now += 0.5
    health.probed(0, None)
    clock.now += 10.0  # served well for healthy_s: a later failure starts over
    health.eject(0, "x")
    assert health.next_due_s() == 0.25


def test_forgotten_workers_start_afresh():
    health = WorkerHealth()
    health.eject(1, "gone")
    health.forget([1])
    assert health.ejected() == set()
    health.probed(1, None)  # a probe that finished after the worker was replaced changes nothing
    assert health.counters["readmissions"] == 0


class FakeWorkers(RepliesAtOnce):
    """ExpertClient's contract: expert e multiplies its rows by e + 1; workers in `failing` fail with `status`."""

    def __init__(self, status=grpc.StatusCode.DEADLINE_EXCEEDED):
        self.failing: set[int] = set()
        self.status = status
        self.sent: list[tuple[int, int]] = []  # (worker, rows) of every call
        self.timeouts: list[float | None] = []  # of every layer call
        self.probes: list[int] = []

    def outstanding(self):
        return {}

    def drain_counters(self):
        return {}

    def forward(self, layer, dispatch, rows, addresses, hedge=None, timeout_s=None):
        replies, start = LayerReplies(torch.empty_like(rows)), 0
        self.timeouts.append(timeout_s)
        for worker, experts, counts in dispatch.per_worker():
            end = start + sum(counts)
            self.sent.append((worker, end - start))
            if worker in self.failing:
                replies.failed.append((ExpertCallError(worker, addresses[worker], layer, experts, self.status, "x"),
                                       start, end))
            else:
                scale = torch.repeat_interleave(torch.tensor(experts) + 1.0, torch.tensor(counts))
                replies.out[start:end] = rows[start:end] * scale[:, None]
            start = end
        return replies

    def probe(self, worker, address, layer, expert, row, timeout_s):
        self.probes.append(worker)
        if worker in self.failing:
            raise ExpertCallError(worker, address, layer, [expert], self.status, "still failing")


def reference(hidden, index, weights):
    return ((index + 1.0).unsqueeze(-1) * hidden.unsqueeze(1) * weights.unsqueeze(-1)).sum(1)


def layer_inputs(tokens=24, experts=4, top_k=2):
    torch.manual_seed(0)
    hidden = torch.randn(tokens, 8)
    index = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    return hidden, index, torch.rand(tokens, top_k)


def router_over(workers, replicas, health=None):
    table = RoutingTable(1, {w: f"w{w}" for w in range(3)}, {0: replicas})
    return ExpertRouter(table, workers, health=health or WorkerHealth(base_s=0.05, max_s=0.05))


def test_only_the_failed_workers_share_is_sent_again():
    workers = FakeWorkers()
    router = router_over(workers, [[0], [1, 2], [1, 2], [0]])  # worker 1's experts also live on worker 2
    hidden, index, weights = layer_inputs()
    workers.failing = {1}
    try:
        out = router.forward(0, hidden, index, weights)
        torch.testing.assert_close(out, reference(hidden, index, weights))
        first, retry = workers.sent[: len(workers.sent) - 1], workers.sent[-1]
        failed_rows = dict(first)[1]
        assert retry == (2, failed_rows)  # worker 0's share was not sent again
        assert router.counters["retries"] == failed_rows
        assert router.health.ejected() == {1}
    finally:
        router.close()


def test_an_ejected_worker_is_probed_and_readmitted_once_it_answers():
    workers = FakeWorkers()
    router = router_over(workers, [[0], [1], [1], [0]])
    hidden, index, weights = layer_inputs()
    workers.failing = {1}
    try:
        with pytest.raises(NoReplica, match="layer 0 expert [12] has no live replica.*DEADLINE_EXCEEDED"):
            router.forward(0, hidden, index, weights)
        with pytest.raises(NoReplica):  # fails fast while ejected: worker 1 gets no call
            calls = len(workers.sent)
            router.forward(0, hidden, index, weights)
        assert len(workers.sent) == calls
        time.sleep(0.3)
        assert workers.probes and router.health.ejected() == {1}  # probed, still failing
        workers.failing = set()
        deadline = time.monotonic() + 5
        while router.health.ejected() and time.monotonic() < deadline:
            time.sleep(0.02)
        torch.testing.assert_close(router.forward(0, hidden, index, weights), reference(hidden, index, weights))
        assert router.health.counters["readmissions"] == 1
    finally:
        router.close()


def test_a_router_that_poisons_gives_nan_to_exactly_the_tokens_that_needed_a_lost_expert():
    workers = FakeWorkers()
    table = RoutingTable(1, {w: f"w{w}" for w in range(3)}, {0: [[0], [1], [1], [0]]})
    router = ExpertRouter(table, workers, health=WorkerHealth(base_s=60, max_s=60), poison_lost=True)
    hidden, index, weights = layer_inputs()
    workers.failing = {1}
    try:
        for _ in range(2):  # the call that ejects worker 1, then one that finds it ejected
            out = router.forward(0, hidden, index, weights)
            lost = ((index == 1) | (index == 2)).any(dim=1)  # [T] tokens routed to worker 1's experts
            assert 0 < int(lost.sum()) < len(lost)
            assert out[lost].isnan().all() and not out[~lost].isnan().any()
            torch.testing.assert_close(out[~lost], reference(hidden, index, weights)[~lost])
        assert router.lost.startswith("layer 0 expert ") and "DEADLINE_EXCEEDED" in router.lost
        assert router.counters["lost_pairs"] == 2 * int(((index == 1) | (index == 2)).sum())
    finally:
        router.close()


def test_an_expert_whose_worker_the_controller_dropped_says_it_is_being_replaced():
    plan = [[(0, 0), (0, 3)], [(0, 1), (0, 2)]]
    table = RoutingTable.from_plan(2, plan, {0: "w0"}, {0: 4})  # worker 1 died; its replacement is not up yet
    router = ExpertRouter(table, FakeWorkers())
    try:
        with pytest.raises(NoReplica, match=r"expert [12] has no live replica \(expert workers \[1\] are gone"):
            router.forward(0, *layer_inputs())
    finally:
        router.close()


def test_a_request_the_router_built_wrongly_is_not_retried():
    workers = FakeWorkers(grpc.StatusCode.INVALID_ARGUMENT)
    router = router_over(workers, [[0, 1], [0, 1], [0, 1], [0, 1]])
    workers.failing = {0, 1}
    try:
        with pytest.raises(ExpertCallError, match="INVALID_ARGUMENT"):
            router.forward(0, *layer_inputs())
        assert router.health.ejected() == set()
    finally:
        router.close()


def test_a_new_routing_table_forgets_only_replaced_workers():
    router = router_over(FakeWorkers(), [[0], [1], [2], [0]])
    try:
        router.health.eject(1, "x")
        router.health.eject(2, "y")
        router.update(RoutingTable(2, {0: "w0", 1: "w1", 2: "w2-new"}, router.table.replicas))
        assert router.health.ejected() == {1}
    finally:
        router.close()


def test_hedging_waits_for_the_layers_usual_time_and_is_rationed():
    from router.hedge import HedgePolicy

    policy = HedgePolicy(factor=4.0, min_s=0.02, budget=0.5, burst=1.0, warmup=3)
    assert policy.after_s(0) is None  # nothing known yet: no hedging
    for seconds in (0.010, 0.012, 0.011):
        policy.observe(0, seconds)
    assert policy.after_s(0) == pytest.approx(0.044) and policy.after_s(1) is None
    for _ in range(3):
        policy.observe(2, 0.001)
    assert policy.after_s(2) == 0.02  # never sooner than min_s
    assert policy.take() and not policy.take()  # the burst is spent
    policy.observe(0, 0.01)
    policy.observe(0, 0.01)  # two calls earn one hedge at budget 0.5
    assert policy.take() and not policy.take()


def test_a_worker_left_as_an_experts_last_live_replica_gets_the_whole_deadline():
    from router.deadline import CallDeadlines

    workers = FakeWorkers()
    router = router_over(workers, [[0, 1], [1, 2], [0, 2], [0, 1]])
    router.deadlines = CallDeadlines(cap_s=30.0, factor=8.0, floor_s=1.0, warmup=1)
    try:
        router.forward(0, *layer_inputs())
        router.forward(0, *layer_inputs())
        assert workers.timeouts[-1] == 1.0  # every expert has another replica: a silent worker is noticed soon
        router.health.eject(2, "cut off")  # experts 1 and 2 are left with one live replica each
        router.forward(0, *layer_inputs())
        assert workers.timeouts[-1] == 30.0
    finally:
        router.close()
