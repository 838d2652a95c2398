"""The GPU check, one command on a machine with one CUDA GPU: `pytest -m gpu tests/gpu` (a few minutes).

Every family served with the serving replica and the expert workers on the GPU gives transformers' greedy tokens on
the same GPU; so does every family in one process, its experts behind the workers' sockets, in float32 and bfloat16;
the default model's decode step is timed with everything on the GPU and on the CPUs; and vllm's fused MoE kernel is
timed against the grouped GEMM.
"""

import copy
import time

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoTokenizer

from cluster.demo_model import default_model_dir
from experts.bank import _LayerExperts
from experts.families import ARCHS, demo_config_kwargs
from experts.layout import experts_modules, meta_model
from experts.vllm_kernel import fused_moe_or_none
from protos.wire.staging import HostStaging
from router.model import load_dense_model
from tests.gpu.conftest import FIGURES
from tests.integration.conftest import deploy, generate, tokens
from tests.integration.test_expert_grpc import GrpcWorkers
from tests.reference import attach, greedy, transformers_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine)")]
PROMPTS = ["Hello, world", "The router sends every token to a few experts."]
SHARE = 0.25  # of the GPU, for the serving replica and each of the two workers


def decisive_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy tokens up to the first whose lead over the runner-up is within the dtype's rounding:
    there either token is right, and the other kernels of a GPU may pick the other."""
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    chosen, rounding = out.sequences[0, len(prompt_ids):].tolist(), torch.finfo(model.dtype).eps
    for position, logits in enumerate(out.logits):
        first, second = logits[0].float().topk(2).values.tolist()
        if first - second <= rounding * abs(first):
            return chosen[:position]
    return chosen


def test_host_staging_round_trips_through_reused_pinned_buffers():
    staging, x = HostStaging(), torch.randn(5, 7, device="cuda", dtype=torch.bfloat16)
    host = staging.to_host(x)
    assert host.is_pinned() and torch.equal(host.cuda(), x)
    assert staging.to_host(x * 2).data_ptr() == host.data_ptr()  # reused, not allocated again
    received = staging.host_like(x).copy_(x.cpu())
    assert received.is_pinned() and torch.equal(staging.to_device(received, x.device), x)
    assert torch.equal(staging.to_device(x.cpu(), x.device), x)  # pageable memory goes through the buffer
    raw = staging.received_bytes(x.numel() * x.element_size())  # as a worker receives a call's rows
    raw[:] = memoryview(x.cpu().reshape(-1).view(torch.uint8).numpy())
    rows = torch.frombuffer(raw, dtype=torch.uint8).view(x.dtype).view(x.shape)
    assert rows.is_pinned() and torch.equal(staging.to_device(rows, x.device), x)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("arch", ARCHS)
def test_one_process_on_the_gpu_gives_transformers_tokens(checkpoints, arch, dtype):
    path = checkpoints[arch]
    dense = load_dense_model(path, dtype, "cuda")
    workers = []
    attach(dense, path, 2, lambda banks: workers.append(GrpcWorkers(banks, unix_sockets=True)) or workers[0],
           dtype=dtype, device="cuda")
    try:
        tokenizer, oracle = AutoTokenizer.from_pretrained(path), transformers_model(path, dtype).to("cuda")
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            want = decisive_greedy(oracle, ids, 16)
            assert greedy(dense, ids, 16)[:len(want)] == want, prompt
    finally:
        workers[0].stop()
    assert {server.servicer.bank.device.type for server in workers[0].servers} == {"cuda"}


@pytest.mark.parametrize("arch", ARCHS)
def test_served_on_the_gpu_gives_transformers_tokens(checkpoints, inference_stub, arch):
    import ray
    from ray import serve

    deploy(arch, checkpoints[arch], num_workers=2, dtype="float32", serving_gpus=SHARE, worker_gpus=SHARE)
    try:
        assert ray.available_resources().get("GPU", 0) == pytest.approx(1 - 3 * SHARE)  # replica and workers hold one
        tokenizer = AutoTokenizer.from_pretrained(checkpoints[arch])
        oracle = transformers_model(checkpoints[arch]).to("cuda")
        for prompt in PROMPTS:
            served = generate(inference_stub, arch, prompt=prompt, max_tokens=16, temperature=0)
            want = decisive_greedy(oracle, tokenizer.encode(prompt), 16)
            assert tokens(served)[:len(want)] == want, prompt
    finally:
        serve.delete(arch)


@pytest.mark.parametrize("where, gpus", (("gpu", SHARE), ("cpus", 0.0)))
def test_default_model_decode_step_time(inference_stub, where, gpus):
    from ray import serve

    name = f"default-{where}"
    deploy(name, default_model_dir(), num_workers=2, serving_gpus=gpus, worker_gpus=gpus)
    try:
        generate(inference_stub, name, prompt="warm up", max_tokens=4, temperature=0)
        started, arrivals = time.perf_counter(), []
        for response in _stream(inference_stub, name, prompt="Hello, world", max_tokens=64, ignore_eos=True):
            arrivals.extend([time.perf_counter()] * len(response.token_ids))
        assert len(arrivals) == 64
        step_ms = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1) * 1e3
        FIGURES.append(f"default model, replica and workers on the {where}: {step_ms:.2f} ms per decode step, "
                       f"first token after {(arrivals[0] - started) * 1e3:.1f} ms")
    finally:
        serve.delete(name)


def _stream(stub, app: str, **fields):
    from protos import inference_pb2

    return stub.Generate(inference_pb2.GenerateRequest(temperature=0, **fields), timeout=120,
                         metadata=[("application", app)])


# A Qwen3-30B-A3B MoE layer: 128 experts of 2048 -> 768, eight per token.
KERNEL_SHAPE = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8)


@pytest.mark.parametrize("tokens_per_call", (16, 256, 2048))
def test_fused_kernel_against_the_grouped_gemm(tokens_per_call):
    module = _random_layer("qwen3_moe", torch.bfloat16)
    fused_moe = fused_moe_or_none(module, torch.device("cuda"))
    if fused_moe is None:
        pytest.skip("the vllm extra is not installed: pip install 'moecluster[vllm]'")
    experts = list(range(module.num_experts))
    fused = _LayerExperts(copy.deepcopy(module), experts, len(experts), fused_moe)
    grouped = _LayerExperts(copy.deepcopy(module), experts, len(experts))
    used, counts, hidden = _routed_rows(tokens_per_call, KERNEL_SHAPE["num_experts_per_tok"], module)
    with torch.inference_mode():
        want = grouped.forward(used, counts, hidden).float()
        assert (fused.forward(used, counts, hidden).float() - want).norm() <= 1e-2 * want.norm()
        fused_ms, grouped_ms = (_ms(lambda m=m: m.forward(used, counts, hidden)) for m in (fused, grouped))
    FIGURES.append(f"{tokens_per_call} tokens x top-{KERNEL_SHAPE['num_experts_per_tok']} on "
                   f"{len(experts)} experts: fused kernel {fused_ms:.3f} ms, grouped GEMM {grouped_ms:.3f} ms")


def _random_layer(arch: str, dtype: torch.dtype, device: str = "cuda") -> torch.nn.Module:
    config = CONFIG_MAPPING[arch](**demo_config_kwargs(arch, 512, num_hidden_layers=1, **KERNEL_SHAPE))
    module = next(iter(experts_modules(meta_model(config)).values()))
    module.to_empty(device=device).to(dtype)
    for param in module.parameters():
        param.data.normal_(0, 0.02)
    return module


def _routed_rows(tokens_per_call: int, top_k: int, module) -> tuple[list[int], list[int], torch.Tensor]:
    """(experts, rows of each, [rows, D] hidden grouped by expert) of one layer call with random top-k routing."""
    generator = torch.Generator().manual_seed(0)
    index = torch.rand(tokens_per_call, module.num_experts, generator=generator).topk(top_k).indices
    per_expert = torch.bincount(index.reshape(-1), minlength=module.num_experts).tolist()
    used = [e for e, n in enumerate(per_expert) if n]
    hidden = torch.randn(tokens_per_call * top_k, module.gate_up_proj.shape[-1], generator=generator)
    return used, [per_expert[e] for e in used], hidden.to(module.gate_up_proj.device, module.gate_up_proj.dtype)


def _ms(call, iters: int = 20) -> float:
    call()  # the first call compiles the fused kernel
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iters):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / iters * 1e3
