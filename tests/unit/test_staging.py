"""Host staging leaves host tensors as they are: no copy, no pinned memory (which needs a GPU)."""

import torch

from protos.wire.staging import HostStaging


def test_host_tensors_pass_through_without_a_copy():
    staging, x = HostStaging(), torch.randn(3, 4, dtype=torch.bfloat16)
    assert staging.to_host(x) is x
    assert staging.to_device(x, torch.device("cpu")) is x
    received = staging.host_like(x)
    assert received.shape == x.shape and received.dtype == x.dtype and not received.is_pinned()
