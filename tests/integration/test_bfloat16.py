"""bfloat16 served end to end: the engine's greedy tokens, with its experts on workers behind their Unix sockets,
equal transformers' in bfloat16, and the activations cross the wire in bfloat16 both ways."""

import pytest
import torch
from transformers import AutoTokenizer

from cluster.engine.engine import Engine
from cluster.engine.sequence import SamplingParams
from experts.families import ARCHS
from router.model import load_dense_model
from tests.integration.test_expert_grpc import GrpcWorkers
from tests.reference import attach, greedy, transformers_model

PROMPTS = ["Hello, world", "The router sends every token to a few experts."]


def record_wire_dtypes(monkeypatch) -> set[str]:
    """The dtype of every tensor header the router's requests and the workers' replies carry on a Unix socket."""
    from experts import unix_server
    from router import client

    seen = set()
    for module in (client, unix_server):
        monkeypatch.setattr(module, "header", lambda t, f=module.header: seen.add(f(t).dtype) or f(t))
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_greedy_tokens_equal_transformers_in_bfloat16(checkpoints, arch, monkeypatch):
    path = checkpoints[arch]
    wire = record_wire_dtypes(monkeypatch)
    dense = load_dense_model(path, "bfloat16")
    workers = []
    attach(dense, path, 2, lambda banks: workers.append(GrpcWorkers(banks, unix_sockets=True)) or workers[0],
           dtype=torch.bfloat16)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        engine = Engine(dense, tokenizer, dense.config.max_position_embeddings, background=False)
        oracle = transformers_model(path, torch.bfloat16)
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            [served] = engine.generate([ids], SamplingParams(max_tokens=12))
            assert served == greedy(oracle, ids, 12), prompt
    finally:
        workers[0].stop()
    assert wire == {"bfloat16"}
