"""A packed step's attention: which keys each query sees, and that every family's attention runs packed on the
device of its activations (the `meta` device standing in for a GPU's)."""

import pytest
import torch

from cluster.engine import kv_batch
from cluster.engine.packed import PREPARED_MASK, Group, PackedStep, use_packed_attention
from experts.families import ARCHS
from router.model import load_dense_model
from tests.devices import one_device


def test_a_query_sees_its_sequences_keys_up_to_itself_within_the_window():
    key_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # the first row left-padded by two
    group = Group(cache=None, key_mask=key_mask, positions=torch.tensor([[2, 3], [4, 5]]), start=0)
    for window in (None, 2):
        allowed = group.allowed(window)[:, 0]  # [G, q, S]
        for row, queries in enumerate(group.positions.tolist()):
            keys = (key_mask[row].cumsum(0) - 1).tolist()
            for q, query in enumerate(queries):
                want = [bool(key_mask[row, s]) and key <= query and (window is None or key > query - window)
                        for s, key in enumerate(keys)]
                assert allowed[row, q].tolist() == want


@pytest.mark.parametrize("arch", ARCHS)
def test_every_familys_attention_runs_packed_on_the_activations_device(checkpoints, arch):
    model = load_dense_model(checkpoints[arch], "float32", "meta")
    use_packed_attention(model)
    config, attention = model.config, model.model.layers[0].self_attn
    groups = [Group(kv_batch.new_cache(config), torch.ones(2, 1, dtype=torch.long, device="meta"),
                    torch.zeros(2, 1, dtype=torch.long, device="meta"), 0),  # two sequences' first tokens
              Group(kv_batch.new_cache(config), torch.ones(1, 5, dtype=torch.long, device="meta"),
                    torch.arange(5, device="meta")[None], 2)]  # and a prompt of five
    step = PackedStep(groups)
    hidden = torch.empty(1, 7, config.hidden_size, device="meta")
    positions = torch.tensor([[0, 0, 0, 1, 2, 3, 4]], device="meta")
    with one_device():
        out, _ = attention(hidden, model.model.rotary_emb(hidden, positions), PREPARED_MASK.to("meta"),
                           cache=step, packed_step=step)
    assert out.device.type == "meta" and out.shape == hidden.shape
    assert [len(kv) for kv in step.kv.values()] == [2]  # both groups cached their keys
