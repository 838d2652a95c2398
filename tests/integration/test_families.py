"""Every family served by the local Ray cluster with 2 expert workers, against transformers' generate."""

from concurrent.futures import ThreadPoolExecutor

import pytest
from ray import serve
from transformers import AutoTokenizer

from experts.families import ARCHS
from tests.integration.conftest import deploy, generate, tokens
from tests.reference import MXFP4, greedy, transformers_model

PROMPTS = ["Hello, world", "The router sends every token to a few experts.", "0123"]


@pytest.mark.parametrize("arch", (*ARCHS, MXFP4))
def test_greedy_generate_equals_transformers(arch, checkpoints, inference_stub):
    deploy(arch, checkpoints[arch], num_workers=2, dtype="float32")
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoints[arch])
        oracle = transformers_model(checkpoints[arch])
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            served = list(pool.map(
                lambda p: generate(inference_stub, arch, prompt=p, max_tokens=16, temperature=0), PROMPTS
            ))
        for prompt, responses in zip(PROMPTS, served):
            expected = greedy(oracle, tokenizer.encode(prompt), 16)
            assert tokens(responses) == expected, prompt
            assert responses[-1].finish_reason == ("length" if len(expected) == 16 else "stop")
    finally:
        serve.delete(arch)
