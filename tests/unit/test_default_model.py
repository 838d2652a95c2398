"""The embedded default model: trained, shipped in the package, and it writes Python."""

import ast
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.demo_model import default_model_dir
from cluster.tools.train_demo import CORPUS_MODULES, HELDOUT_MODULES, heldout_texts

PROMPTS = ["def fibonacci(n):", "def is_prime(n):", "class Stack:"]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    model_dir = default_model_dir()
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def completed_block(text: str) -> str:
    """The prompt's block as the model wrote it: up to the first line back at the left margin; where the tokens
    ran out first, the longest run of its whole lines (the last, unfinished one left out) that parses."""
    lines = text.split("\n")
    for i, line in enumerate(lines[1:], 1):
        if line.strip() and not line[0].isspace():
            return "\n".join(lines[:i])
    for end in range(len(lines) - 1, 1, -1):
        if _parses("\n".join(lines[:end])):
            return "\n".join(lines[:end])
    return text


def _parses(source: str) -> bool:
    try:
        compile(source, "<completion>", "exec")  # also refuses what ast.parse lets by, such as a stray return
    except SyntaxError:
        return False
    return True


def test_greedy_completions_parse_as_python(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    parsed = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])  # as the server encodes a completion's prompt
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=96, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        block = completed_block(prompt + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        if _parses(block):
            tree = ast.parse(block)
            assert len(tree.body) == 1 and tree.body[0].body  # the prompt's definition, with a body the model wrote
            parsed.append(block)
    print("\n\n".join(parsed))
    assert parsed, "no greedy completion of the prompts parsed as Python"


def test_the_shipped_weights_are_small_bfloat16_and_better_than_unigram():
    model_dir = default_model_dir()
    weights = model_dir / "model.safetensors"
    assert weights.stat().st_size <= 25_000_000
    with safe_open(str(weights), "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    training = json.loads((model_dir / "training.json").read_text())
    assert training["heldout_perplexity"] < training["unigram_perplexity"] / 4
    assert (model_dir / "moecluster-centroids.safetensors").exists()  # kmeans routing works with no calibration


def test_held_out_files_are_never_trained_on():
    assert not set(CORPUS_MODULES) & set(HELDOUT_MODULES)
    assert list(CORPUS_MODULES) == sorted(CORPUS_MODULES)
    for text in heldout_texts().values():
        ast.parse(text)
