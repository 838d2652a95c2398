import pytest

from cluster.placement import expert_owner, plan_placement


def test_every_expert_placed_once_and_layers_spread_over_workers():
    shape = {1: 8, 2: 8, 3: 8}
    plan = plan_placement(shape, 3)
    owners = expert_owner(plan)
    assert sorted(owners) == [(layer, e) for layer in shape for e in range(8)]
    for layer in shape:
        assert {owners[layer, e] for e in range(8)} == {0, 1, 2}
    assert max(map(len, plan)) - min(map(len, plan)) <= 1


def test_zero_workers_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        plan_placement({0: 4}, 0)
