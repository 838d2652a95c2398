"""Where one decode step's time goes, micro-batch by micro-batch: the engine on the served application's workers,
`streams` sequences decoding, one step recorded (router/timeline.py) at each count of micro-batches."""

import ray
import torch
from transformers import AutoTokenizer

from cluster.control import ops
from cluster.engine.engine import Engine
from cluster.engine.sequence import SamplingParams, Sequence
from router.client import ExpertClient
from router.model import load_dense_model
from router.remote import ExpertRouter
from router.seam import route_experts

WARM_STEPS = 6  # the prompts' prefill, then decode steps until the calls' times settle


def run_timeline(model_dir: str, app: str, dtype: str, lanes: tuple[int, ...] = (1, 2), streams: int = 32,
                 prompt_tokens: int = 32, threads: int | None = None) -> dict:
    """{micro-batches: StepRecord.as_json()} of one decode step of `streams` sequences with `prompt_tokens`-token
    prompts, through `app`'s expert workers."""
    if threads:
        torch.set_num_threads(threads)
    controller = ops.controllers(app)[0]
    table, key = ray.get([controller.routing_table.remote(), controller.data_path_key.remote()])
    model = load_dense_model(model_dir, dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    router = ExpertRouter(table, ExpertClient(timeout_s=60, key=key))
    route_experts(model, router)
    try:
        return {str(n): _one_step(model, tokenizer, router, n, streams, prompt_tokens) for n in lanes}
    finally:
        router.close()


def _one_step(model, tokenizer, router: ExpertRouter, lanes: int, streams: int, prompt_tokens: int) -> dict:
    engine = Engine(model, tokenizer, model.config.max_position_embeddings, max_batch_size=streams,
                    step_tokens=router.tokens, lanes=lanes, background=False)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, model.config.vocab_size, (streams, prompt_tokens), generator=generator).tolist()
    params = SamplingParams(max_tokens=WARM_STEPS + 2, ignore_eos=True)
    engine.submit_all([Sequence(ids, params, lambda event: None) for ids in prompts])
    for _ in range(WARM_STEPS):
        engine.step()
    with router.timeline.recording() as record:
        engine.step()
    while engine.step():  # the sequences finish
        pass
    return record.as_json()
