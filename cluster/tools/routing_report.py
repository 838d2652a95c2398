"""What each routing policy does to load balance, to the model's outputs, and to throughput, on the same prompts.

Everything runs in this process (the dense model and every expert, no Ray), so policies differ only in routing.
"""

import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from cluster.control.placement import WorkerSlot, expert_owner, plan_placement, replica_counts
from cluster.demo_model import CORPUS
from experts.keys import expert_key, parse_expert_key
from experts.layout import experts_modules
from router.local import attach_local_experts
from router.model import load_dense_model
from router.policies import POLICIES, fit_kmeans
from router.routing import centroids_path, load_centroids, policy_for_model, save_centroids

REPORT_PROMPTS = [
    "The experts of a mixture-of-experts layer",
    "Hello, world! How are you today?",
    "0123456789 + - * / = ( ) [ ]",
    "Serving them well means placing experts across machines",
    "Pack my box with five dozen liquor jugs.",
    "the the the the the the the the",
]
CALIBRATION_PROMPTS = [line for line in CORPUS.splitlines() if line.strip()]


def _load(model_dir):
    model = load_dense_model(model_dir, "float32")
    return model, attach_local_experts(model, model_dir), AutoTokenizer.from_pretrained(model_dir)


def calibrate(model_dir, prompts: list[str] | None = None, out: str | None = None, seed: int = 0) -> Path:
    """Fit k-means centroids (one per expert) on each MoE layer's inputs over sample prompts; store them."""
    model, _, tokenizer = _load(model_dir)
    seen: dict[int, list[torch.Tensor]] = {}
    for layer, module in experts_modules(model).items():
        module.register_forward_pre_hook(lambda m, args, layer=layer: seen.setdefault(layer, []).append(args[0]))
    with torch.no_grad():
        for prompt in prompts or CALIBRATION_PROMPTS:
            model(torch.tensor([tokenizer.encode(prompt)]))
    centroids = {layer: fit_kmeans(torch.cat(h).float(), experts_modules(model)[layer].num_experts, seed=seed)
                 for layer, h in seen.items()}
    path = centroids_path(model_dir, out)
    save_centroids(path, centroids)
    return path


def routing_report(model_dir, prompts: list[str] | None = None, workers: int = 4, capacity_factor=None,
                   gen_tokens: int = 16, policies=POLICIES) -> dict:
    model, router, tokenizer = _load(model_dir)
    prompts = prompts or REPORT_PROMPTS
    ids, mask = _batch([tokenizer.encode(p) for p in prompts])
    worker_of = _worker_of(model, workers)
    path = centroids_path(model_dir)
    if "kmeans" in policies and not path.exists():
        calibrate(model_dir)
    rows, reference = {}, None
    for name in policies:
        centroids = load_centroids(path) if name == "kmeans" else None
        router.policy = policy_for_model(model, name, capacity_factor=capacity_factor, centroids=centroids)
        router.drain()
        with torch.no_grad(), router.tokens(ids):
            logprobs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)[mask.bool()]  # [N, V]
        reference = logprobs if reference is None else reference
        rows[name] = {**_balance(router.drain()[0], worker_of), **_fidelity(reference, logprobs),
                      "decode_tokens_per_s": _throughput(model, router, tokenizer, prompts, gen_tokens)}
    return {"model": str(model_dir), "prompts": len(prompts), "workers": workers,
            "capacity_factor": capacity_factor, "policies": rows}


def _batch(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _worker_of(model, workers: int) -> dict[str, int]:
    shape = {layer: m.num_experts for layer, m in experts_modules(model).items()}
    plan = plan_placement(replica_counts(shape, {}), [WorkerSlot(f"n{i}") for i in range(workers)], 1)
    return {expert_key(*pair): hosts[0] for pair, hosts in expert_owner(plan).items()}


def _balance(tokens: dict[str, int], worker_of: dict[str, int]) -> dict:
    per_layer: dict[int, list[int]] = {}
    for pair in worker_of:
        per_layer.setdefault(parse_expert_key(pair)[0], []).append(tokens.get(pair, 0))
    per_worker = [0] * (max(worker_of.values()) + 1)
    for pair, n in tokens.items():
        per_worker[worker_of[pair]] += n
    expert = sum(max(c) / (sum(c) / len(c)) for c in per_layer.values() if sum(c)) / len(per_layer)
    return {"expert_max_over_mean": expert, "worker_max_over_mean": max(per_worker) / (sum(per_worker) / len(per_worker))}


def _fidelity(reference: torch.Tensor, logprobs: torch.Tensor) -> dict:
    kl = (reference.exp() * (reference - logprobs)).sum(-1)  # [N] KL(model || policy)
    agree = (reference.argmax(-1) == logprobs.argmax(-1)).float()
    return {"top1_agreement": float(agree.mean()), "mean_kl": float(kl.mean())}


def _throughput(model, router, tokenizer, prompts: list[str], gen_tokens: int) -> float:
    from cluster.engine.engine import Engine
    from cluster.engine.sequence import SamplingParams

    engine = Engine(model, tokenizer, model.config.max_position_embeddings, step_tokens=router.tokens,
                    background=False)
    started = time.perf_counter()
    outputs = engine.generate([tokenizer.encode(p) for p in prompts], SamplingParams(gen_tokens, ignore_eos=True))
    return sum(map(len, outputs)) / (time.perf_counter() - started)


def format_report(report: dict) -> str:
    header = f"{'policy':<10} {'expert max/mean':>16} {'worker max/mean':>16} {'top-1 agree':>12} {'mean KL':>9} "
    lines = [header + f"{'decode tok/s':>13}"]
    for name, r in report["policies"].items():
        lines.append(f"{name:<10} {r['expert_max_over_mean']:>16.2f} {r['worker_max_over_mean']:>16.2f} "
                     f"{r['top1_agreement']:>12.3f} {r['mean_kl']:>9.4f} {r['decode_tokens_per_s']:>13.1f}")
    return "\n".join(lines)
