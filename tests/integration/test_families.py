"""Every family served by the local Ray cluster with 2 expert workers, against transformers' generate."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from ray import serve
from transformers import AutoTokenizer

from cluster.tools.scoring import score, scoring_prompts
from experts.families import ARCHS
from tests.integration.conftest import deploy, generate, tokens
from tests.reference import MXFP4, greedy, transformers_model

PROMPTS = ["Hello, world", "The router sends every token to a few experts.", "0123"]
SCORED = scoring_prompts(vocab_size=256, count=8, tokens=24, seed=0)  # every family's vocabulary is larger


@pytest.mark.parametrize("arch", (*ARCHS, MXFP4))
def test_greedy_generate_and_batched_scoring_equal_transformers(arch, checkpoints, inference_stub, serve_endpoints):
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
        scored = score(f"{serve_endpoints[0]}/{arch}", arch, SCORED)
        with torch.no_grad():
            want = torch.log_softmax(oracle(torch.tensor(SCORED)).logits[:, :-1], -1)  # [prompts, L - 1, V]
        want = want.gather(-1, torch.tensor(SCORED)[:, 1:, None])[..., 0]
        assert [lp for s in scored for lp in s[1:]] == pytest.approx(want.flatten().tolist(), abs=1e-4)
    finally:
        serve.delete(arch)
