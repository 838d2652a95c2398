"""A partition must not let one side take the other's healthy workers down: the controller acts on a silent worker
only when the routers cannot reach it either, and a worker frees itself only when no router calls it."""

import threading
import time

import pytest

from cluster.control import workers
from cluster.control.controller import silent_to_routers
from experts import worker
from experts.worker import Owner


def test_a_worker_silent_to_the_controller_is_replaced_only_when_every_router_ejected_it_too():
    assert silent_to_routers([1, 2], [[1], [1, 2]]) == [1]
    assert silent_to_routers([1, 2], [[1, 2], [2, 1]]) == [1, 2]
    assert silent_to_routers([1, 2], [[], []]) == []  # the routers reach both: the controller is the one cut off
    assert silent_to_routers([1, 2], []) == []  # no router heard from: nothing to confirm it by


@pytest.fixture
def owner_gone(monkeypatch):
    """A worker whose owner cannot be found; yields (served seconds to set, event set once it freed itself)."""
    def not_found(name, namespace):
        raise ValueError(name)

    monkeypatch.setattr(worker, "OWNER_CHECK_S", 0.02)
    monkeypatch.setattr(worker.ray, "get_actor", not_found)
    monkeypatch.setattr(worker.ray, "kill", lambda actor, no_restart: None)
    monkeypatch.setattr(worker.ray, "get_runtime_context", lambda: type("Context", (), {"current_actor": None}))
    freed, served = threading.Event(), [0.0]
    owner = Owner("controller", "serve", freed.set, grace_s=0.2)
    threading.Thread(target=worker._outlive_no_owner, args=(owner, lambda: served[0]), daemon=True).start()
    return served, freed


def test_a_worker_that_routers_still_call_outlives_its_absent_owner(owner_gone):
    served, freed = owner_gone
    until = time.monotonic() + 0.6  # three times the grace
    while time.monotonic() < until:
        served[0] += 0.001
        time.sleep(0.01)
    assert not freed.is_set()
    assert freed.wait(2.0)  # calls stopped: the owner is gone for good


def test_a_new_worker_whose_node_dies_before_it_starts_is_given_up(monkeypatch):
    """Ray may keep a worker bound for a host cut off before Ray took it for dead waiting there for good: once the
    node is dead, the controller starts another, on the live node the bundle moves to."""
    alive = {"node-a": True}
    monkeypatch.setattr(workers.ray, "wait", lambda refs, timeout: ([], refs))
    monkeypatch.setattr(workers.ray, "nodes", lambda: [{"NodeID": n, "Alive": a} for n, a in alive.items()])
    monkeypatch.setattr(workers, "NODE_CHECK_S", 0.01)
    with pytest.raises(workers.GetTimeoutError):  # its node lives: it may take its time, up to the deadline
        workers._started("ref", "node-a", time.monotonic() + 0.05)
    alive["node-a"] = False
    with pytest.raises(workers.PlacementError, match="died before it started"):
        workers._started("ref", "node-a", time.monotonic() + 60)
    monkeypatch.setattr(workers.ray, "wait", lambda refs, timeout: (refs, []))
    monkeypatch.setattr(workers.ray, "get", lambda ref: "10.0.0.1:7000")
    assert workers._started("ref", "node-a", time.monotonic() + 60) == "10.0.0.1:7000"
