"""Log-likelihood scoring as evaluation harnesses send it (`echo`, `logprobs`, `max_tokens` 0, prompts as token
arrays): one request holding every prompt, the same prompts one request after another, and transformers' forward
over the same prompts in one batch. Throughputs in scored prompt tokens per second."""

import time

import httpx
import torch


def scoring_prompts(vocab_size: int, count: int, tokens: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (count, tokens), generator=generator).tolist()


def score(url: str, model: str, prompts: list[list[int]], headers: dict | None = None) -> list[list[float | None]]:
    """Each prompt's token logprobs, all prompts in one /v1/completions request."""
    body = {"model": model, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 0}
    reply = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=600)
    reply.raise_for_status()
    choices = sorted(reply.json()["choices"], key=lambda c: c["index"])
    return [c["logprobs"]["token_logprobs"] for c in choices]


def run_scoring(url: str, model: str, prompts: list[list[int]], headers: dict | None = None) -> dict:
    """Scored tokens per second with every prompt in one request, and with one request per prompt in turn."""
    scored = sum(len(p) - 1 for p in prompts)  # a prompt's first token has no logprob
    score(url, model, prompts[:1], headers)  # warm: the first request pays for lazy set-up
    started = time.perf_counter()
    score(url, model, prompts, headers)
    batched_s = time.perf_counter() - started
    started = time.perf_counter()
    for prompt in prompts:
        score(url, model, [prompt], headers)
    one_by_one_s = time.perf_counter() - started
    return {"prompts": len(prompts), "scored_tokens": scored, "batched_tok_s": scored / batched_s,
            "one_by_one_tok_s": scored / one_by_one_s, "batched_speedup": one_by_one_s / batched_s}


def transformers_scoring(model, prompts: list[list[int]]) -> dict:
    """transformers' forward over the prompts in one batch (equal lengths: no padding), with the log-softmax."""
    ids = torch.tensor(prompts)  # [count, tokens]
    with torch.inference_mode():
        model(ids[:1])
        started = time.perf_counter()
        logprobs = torch.log_softmax(model(ids).logits[:, :-1].float(), dim=-1)  # [count, tokens - 1, V]
        logprobs.gather(-1, ids[:, 1:, None])
        wall_s = time.perf_counter() - started
    return {"prompts": len(prompts), "scored_tokens": ids[:, 1:].numel(), "tok_s": ids[:, 1:].numel() / wall_s}
