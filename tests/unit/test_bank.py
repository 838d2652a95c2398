"""A worker's bank keeps each expert's math exact while experts are added and removed around it."""

import pytest
import torch

from experts.bank import ExpertBank
from experts.families import ARCHS
from experts.layout import load_config, moe_shape


@pytest.mark.parametrize("arch", ARCHS)
def test_experts_kept_across_add_and_remove_compute_as_freshly_loaded(checkpoints, arch):
    path = checkpoints[arch]
    layer = next(iter(moe_shape(path)))
    grown = ExpertBank(path, [(layer, 3)])
    grown.add([(layer, 1), (layer, 2)])
    grown.remove([(layer, 2)])
    x = torch.randn(5, load_config(path).hidden_size, generator=torch.Generator().manual_seed(0))
    fresh = ExpertBank(path, [(layer, 1), (layer, 3)]).forward(layer, [1, 3], [2, 3], x)
    torch.testing.assert_close(grown.forward(layer, [1, 3], [2, 3], x), fresh, rtol=0, atol=0)
    assert grown.pairs == [(layer, 1), (layer, 3)]
