"""The expert math finds every tensor it creates on the device of the tensors it meets: weights and activations
on the `meta` device, under `one_device`, fail here as they would on a GPU."""

import json
import shutil

import grpc
import pytest
import torch

from experts import bank
from experts.bank import ExpertBank
from experts.families import ARCHS
from experts.layout import expert_nbytes, load_config, moe_shape
from router.client import ExpertCallError, LayerReplies
from router.local import LocalExperts
from router.model import load_dense_model
from router.remote import ExpertRouter
from router.table import RoutingTable
from tests.devices import DeviceMixed, one_device
from tests.reference import MXFP4

PATHS = ("per_group", "batched")


def layer_bank(path, device="meta"):
    layer, experts = next(iter(moe_shape(path).items()))
    return layer, experts, ExpertBank(path, [(layer, e) for e in range(experts)], device=device)


def test_one_device_refuses_what_the_meta_device_lets_through():
    weight = torch.empty(3, 2, device="meta")
    torch.mm(torch.empty(4, 3, device="meta"), torch.randn(3, 2))  # the meta device alone: no error
    with one_device(), pytest.raises(DeviceMixed, match="meta"):
        torch.mm(torch.randn(4, 3), weight)
    with one_device():
        weight.copy_(torch.randn(3, 2))  # an explicit move is allowed


@pytest.mark.parametrize("call", PATHS)
@pytest.mark.parametrize("arch", (*ARCHS, MXFP4))
def test_bank_paths_keep_to_the_weights_device(checkpoints, arch, call, monkeypatch):
    layer, experts, hosted = layer_bank(checkpoints[arch])
    if call == "per_group":
        monkeypatch.setattr(bank, "BATCHED_MAX_ROWS", 0)
    taken = []
    monkeypatch.setattr(bank._LayerExperts, "_batched",
                        lambda self, *a, f=bank._LayerExperts._batched: taken.append(1) or f(self, *a))
    counts = [2, 0, 3] + [1] * (experts - 3)
    used = [e for e, n in enumerate(counts) if n]
    hidden = torch.empty(sum(counts), load_config(checkpoints[arch]).hidden_size, device="meta")
    with one_device():
        out = hosted.forward(layer, used, [counts[e] for e in used], hidden)
    assert out.device.type == "meta" and out.shape == hidden.shape and out.dtype == hosted.dtype
    assert bool(taken) == (call == "batched")


class FailsOnce(LocalExperts):
    """In-process banks whose first call loses worker 0's share, as a worker that died mid-call would."""

    def forward(self, layer, dispatch, rows, addresses, hedge=None, timeout_s=None):
        replies = super().forward(layer, dispatch, rows, addresses)
        shares = dispatch.per_worker()
        if not getattr(self, "failed", False) and len(shares) > 1 and shares[0][0] == 0:
            self.failed = True
            error = ExpertCallError(0, "bank-0", layer, shares[0][1], grpc.StatusCode.UNAVAILABLE, "gone")
            return LayerReplies(replies.out, replies.compute_s, [(error, 0, sum(shares[0][2]))])
        return replies


@pytest.mark.parametrize("arch", ARCHS)
def test_router_dispatch_retry_and_combine_keep_to_the_activations_device(checkpoints, arch):
    path = checkpoints[arch]
    layer, experts = next(iter(moe_shape(path).items()))
    pairs = [(layer, e) for e in range(experts)]
    banks = [ExpertBank(path, pairs, device="meta") for _ in range(2)]  # every expert on both: a retry has a place
    router = ExpertRouter(RoutingTable.from_plan(0, [pairs, pairs], {0: "bank-0", 1: "bank-1"}, {layer: experts}),
                          FailsOnce(banks))
    try:
        tokens, top_k = 40, 2  # enough rows per expert that both replicas get a share
        index = torch.stack([torch.randperm(experts, generator=torch.Generator().manual_seed(t))[:top_k]
                             for t in range(tokens)])  # the gate's choices, as the host reads them
        hidden = torch.empty(tokens, load_config(path).hidden_size, device="meta")
        with one_device():
            out = router.forward(layer, hidden, index, torch.empty(tokens, top_k, device="meta"))
        assert out.device.type == "meta" and out.shape == hidden.shape
        assert router.drain_counters()["retries"] > 0
    finally:
        router.close()


@pytest.mark.parametrize("arch", ("mixtral", "gpt_oss"))
def test_the_dense_model_is_loaded_whole_on_the_device_asked_for(checkpoints, arch):
    dense = load_dense_model(checkpoints[arch], "bfloat16", "meta")
    tensors = dict(dense.named_parameters()) | dict(dense.named_buffers())
    assert {name for name, t in tensors.items() if t.device.type != "meta"} == set()
    assert {t.dtype for t in dense.parameters()} == {torch.bfloat16}


def test_a_float16_checkpoint_is_budgeted_as_the_worker_holds_it(checkpoints, tmp_path):
    path = shutil.copytree(checkpoints["olmoe"], tmp_path / "olmoe-fp16")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))
    on_cpu, on_gpu = expert_nbytes(path, "auto", "cpu"), expert_nbytes(path, "auto", "cuda")
    assert on_cpu == 2 * on_gpu  # float16 runs as float32 on a CPU only
    assert ExpertBank(path, [(0, 0)], device="meta").dtype == torch.float16
