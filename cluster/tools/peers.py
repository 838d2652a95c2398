"""transformers as a user runs it offline, the bench's peers: `generate` on static batches, and its own
continuous batching. Both generate each request's exact output length (EOS ignored) and count only those
tokens.
"""

import os
import time

import torch

from cluster.tools.workload import Request, padded_steps, static_batches


def load(model_dir: str, threads: int, dtype: str):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()


def run_static(model, requests: list[Request], batch_size: int) -> dict:
    """`generate` on batches of `batch_size` requests in arrival order, left-padded, each batch until its
    longest output ends."""
    batches = static_batches(requests, batch_size)
    _generate(model, requests[:1], 2)  # warm-up
    started = time.perf_counter()
    for batch in batches:
        _generate(model, batch, max(r.output_tokens for r in batch))
    return _result(requests, time.perf_counter() - started,
                   batches=len(batches), batch_size=batch_size, computed_rows=padded_steps(batches))


def _generate(model, batch: list[Request], new_tokens: int) -> torch.Tensor:
    from cluster.engine.kv_batch import left_padded

    ids, mask = left_padded([r.prompt_ids for r in batch], pad_id=0)  # [n, L], [n, L]
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0)


def run_continuous(model, requests: list[Request], batch_size: int) -> dict:
    """transformers' continuous batching (the manager `generate_batch` drives; driven here directly, as
    `generate_batch` takes one max_new_tokens for all), every request queued at once. A failure is reported,
    not raised: this peer is optional where transformers cannot run it."""
    try:
        return _continuous(model, requests, batch_size)
    except Exception as error:  # noqa: BLE001 -- any failure of the peer skips it
        return {"skipped": True, "error": f"{type(error).__name__}: {error}"}


def _continuous(model, requests: list[Request], batch_size: int) -> dict:
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(
        generation_config=config, continuous_batching_config=ContinuousBatchingConfig(max_requests_per_batch=batch_size))
    manager.start()
    try:
        _drain(manager, requests[:1])  # warm-up
        started = time.perf_counter()
        tokens = _drain(manager, requests)
        wall = time.perf_counter() - started
    finally:
        manager.stop(block=True)
    expected = sum(r.output_tokens for r in requests)
    if tokens != expected:
        raise RuntimeError(f"continuous batching generated {tokens} tokens, not the {expected} asked for")
    return _result(requests, wall, batch_size=batch_size)


def _drain(manager, requests: list[Request], timeout_s: float = 600) -> int:
    """Queue every request, wait for all; the tokens they generated."""
    ids = [manager.add_request(r.prompt_ids, max_new_tokens=r.output_tokens, eos_token_id=-1) for r in requests]
    deadline, done = time.monotonic() + timeout_s, {}
    while len(done) < len(ids):
        result = manager.get_result(timeout=1)
        if result is None and (not manager.is_running() or time.monotonic() > deadline):
            raise RuntimeError(f"continuous batching stopped with {len(ids) - len(done)} requests unfinished")
        if result is not None and result.is_finished():
            if result.error:
                raise RuntimeError(result.error)
            done[result.request_id] = len(result.generated_tokens)
    return sum(done.values())


def _result(requests: list[Request], wall_s: float, **extra) -> dict:
    tokens = sum(r.output_tokens for r in requests)
    return {"requests": len(requests), "output_tokens": tokens, "wall_s": wall_s, "output_tokens_per_s": tokens / wall_s,
            "load_1m": os.getloadavg()[0], **extra}
