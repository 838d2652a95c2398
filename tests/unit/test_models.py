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
