"""Call deadlines from measured call times: a silent worker is noticed long before the expert deadline."""

from router.deadline import CallDeadlines
from router.table import RoutingTable


def test_the_whole_expert_deadline_until_calls_are_known_or_where_there_is_no_other_replica():
    deadlines = CallDeadlines(cap_s=30.0, factor=8.0, floor_s=1.0, warmup=4)
    assert deadlines.timeout_s(0, replicated=True) == 30.0
    for _ in range(4):
        deadlines.observe(0, 0.5)
    assert deadlines.timeout_s(0, replicated=True) == 4.0
    assert deadlines.timeout_s(0, replicated=False) == 30.0
    assert deadlines.timeout_s(1, replicated=True) == 30.0  # another layer: nothing known yet


def test_a_multiple_of_the_p99_with_a_floor_and_a_cap():
    deadlines = CallDeadlines(cap_s=3.0, factor=8.0, floor_s=1.0, window=100, warmup=1)
    for _ in range(99):
        deadlines.observe(0, 0.01)
    assert deadlines.timeout_s(0, replicated=True) == 1.0  # 8 x 10 ms, raised to the floor
    deadlines.observe(0, 0.2)
    deadlines.observe(0, 0.2)  # the window keeps the last 100: p99 is now 0.2 s
    assert deadlines.timeout_s(0, replicated=True) == 1.6
    deadlines.observe(0, 1.0)
    deadlines.observe(0, 1.0)
    assert deadlines.timeout_s(0, replicated=True) == 3.0  # never past the expert deadline


def test_a_layer_is_replicated_only_when_every_expert_has_two_replicas():
    table = RoutingTable(1, {0: "a", 1: "b"}, {0: [[0, 1], [0, 1]], 1: [[0, 1], [1]]})
    assert table.replicated == {0} and table.hedgeable == {0, 1}
