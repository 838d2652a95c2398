"""What each routing policy costs: held-out perplexity, agreement with the learned gate, load balance, and which
kinds of token each expert takes, on the same text (by default the embedded model's held-out Python files).

Everything runs in this process (the dense model and every expert, no Ray), so policies differ only in routing.
"""

import math
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from cluster.control.placement import (
    WorkerSlot, expert_owner, plan_placement, rebalance_counts, replica_counts, worker_loads,
)
from cluster.demo_model import CORPUS
from cluster.tools.token_kinds import KINDS, token_kinds
from experts.keys import expert_key, parse_expert_key
from experts.layout import experts_modules, experts_paths
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
CONTEXT = 512
DEFAULT_CAPACITY_FACTOR = 1.25


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
            model(torch.tensor([tokenizer.encode(prompt)[:CONTEXT]]))
    centroids = {layer: fit_kmeans(torch.cat(h).float(), experts_modules(model)[layer].num_experts, seed=seed)
                 for layer, h in seen.items()}
    path = centroids_path(model_dir, out)
    save_centroids(path, centroids)
    return path


def default_texts() -> list[str]:
    from cluster.tools.train_demo import heldout_texts

    return list(heldout_texts().values())


def routing_report(model_dir, texts: list[str] | None = None, workers: int = 4,
                   capacity_factor: float | None = DEFAULT_CAPACITY_FACTOR, gen_tokens: int = 16,
                   policies=POLICIES, max_tokens: int | None = None) -> dict:
    """Each policy at top-2 (the model's) and top-1, without and with `capacity_factor`, against the model's own
    gate at top-2; the gate's tokens per expert by kind; the load before and after a rebalance."""
    model, router, tokenizer = _load(model_dir)
    texts = texts or default_texts()
    ids, kinds = windows(tokenizer, texts, max_tokens)
    path = centroids_path(model_dir)
    if "kmeans" in policies and not path.exists():
        calibrate(model_dir)
    centroids = load_centroids(path) if "kmeans" in policies else None
    worker_of, rows, reference = _worker_of(model, workers), [], None
    choices = _record_gate(model)
    policies = ["model", *(p for p in policies if p != "model")]  # the learned gate at its own top-k comes first
    top_ks = _top_ks(model)
    for top_k in top_ks:
        for factor in dict.fromkeys([None, capacity_factor]):
            for name in policies:
                row, logprobs = _evaluate(model, router, ids, name, top_k, factor, centroids)
                if reference is None:
                    reference, gate_choices, load = logprobs, dict(choices), dict(row["tokens"])
                row.update(policy=name, top_k=top_k, capacity_factor=factor, **_balance(row.pop("tokens"), worker_of),
                           **_fidelity(reference, logprobs, ids))
                rows.append(row)
                choices.clear()
    _set_top_k(model, top_ks[0])
    speed = {name: _throughput(model, router, tokenizer, name, centroids, gen_tokens) for name in policies} \
        if gen_tokens else {}
    return {"model": str(model_dir), "tokens": ids.numel(), "workers": workers, "capacity_factor": capacity_factor,
            "rows": rows, "decode_tokens_per_s": speed, "kinds": _kinds_per_expert(gate_choices, kinds),
            "rebalance": _rebalance(load, model, workers)}


def windows(tokenizer, texts: list[str], max_tokens: int | None) -> tuple[torch.Tensor, list[str]]:
    """The texts as one stream, each <s> text </s>, cut into windows of CONTEXT tokens ([B, W]); each token's kind."""
    stream, kinds = [], []
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        stream += [tokenizer.bos_token_id, *enc["input_ids"], tokenizer.eos_token_id]
        kinds += ["other", *token_kinds(text, enc["offset_mapping"]), "other"]
    stream, kinds = stream[:max_tokens], kinds[:max_tokens]
    width = min(CONTEXT, len(stream))
    usable = len(stream) // width * width
    return torch.tensor(stream[:usable]).view(-1, width), kinds[:usable]


def _top_ks(model) -> list[int]:
    """The model's own top-k, and top-1 where the gate's k can be changed."""
    gates = _gates(model)
    k = gates[0].top_k if all(hasattr(g, "top_k") for g in gates) else None
    return [k, 1] if k and k > 1 else [k or model.config.num_experts_per_tok]


def _gates(model) -> list[torch.nn.Module]:
    blocks = [model.get_submodule(path.rpartition(".")[0]) for path in experts_paths(model).values()]
    return [getattr(b, "gate", None) if isinstance(getattr(b, "gate", None), torch.nn.Module) else b.router
            for b in blocks]


def _set_top_k(model, top_k: int) -> None:
    for gate in _gates(model):
        if hasattr(gate, "top_k"):
            gate.top_k = top_k


def _record_gate(model) -> dict[int, torch.Tensor]:
    """{layer: [T, K] experts the model's gate chose}, refilled by every forward (before any policy)."""
    choices: dict[int, torch.Tensor] = {}
    for layer, module in experts_modules(model).items():
        route = module.moecluster_route

        def recording(hidden, index, weights, layer=layer, route=route):
            choices[layer] = index.cpu()
            return route(hidden, index, weights)

        module.moecluster_route = recording
    return choices


def _evaluate(model, router, ids, name, top_k, factor, centroids) -> tuple[dict, torch.Tensor]:
    _set_top_k(model, top_k)
    router.policy = policy_for_model(model, name, capacity_factor=factor,
                                     centroids=centroids if name == "kmeans" else None)
    router.drain()
    with torch.no_grad(), router.tokens(ids):
        logprobs = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)  # [B, W-1, V]
    nll = -logprobs.gather(-1, ids[:, 1:, None]).mean()
    return {"perplexity": math.exp(float(nll)), "tokens": router.drain()[0]}, logprobs


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


def _fidelity(reference: torch.Tensor, logprobs: torch.Tensor, ids: torch.Tensor) -> dict:
    kl = (reference.exp() * (reference - logprobs)).sum(-1)  # [B, W-1] KL(model || policy)
    agree = (reference.argmax(-1) == logprobs.argmax(-1)).float()
    correct = (logprobs.argmax(-1) == ids[:, 1:]).float()
    return {"agreement": float(agree.mean()), "mean_kl": float(kl.mean()), "next_token_accuracy": float(correct.mean())}


def _kinds_per_expert(choices: dict[int, torch.Tensor], kinds: list[str]) -> dict:
    """Per layer: {kind: share of that kind's routes to each expert}, and the mutual information of kind and
    expert in bits (0: the experts take every kind alike)."""
    out = {}
    for layer, index in choices.items():
        experts = index.shape[0] and int(index.max()) + 1
        counts = {kind: [0] * experts for kind in KINDS}
        for kind, row in zip(kinds, index.tolist()):
            for e in row:
                counts[kind][e] += 1
        counts = {k: c for k, c in counts.items() if sum(c)}
        out[layer] = {"share": {k: [n / sum(c) for n in c] for k, c in counts.items()},
                      "tokens": {k: sum(c) // index.shape[1] for k, c in counts.items()},
                      "mutual_information_bits": _mutual_information(counts)}
    return out


def _mutual_information(counts: dict[str, list[int]]) -> float:
    total = sum(map(sum, counts.values()))
    per_expert = [sum(col) for col in zip(*counts.values())]
    bits = 0.0
    for row in counts.values():
        for e, n in enumerate(row):
            if n:
                bits += n / total * math.log2(n * total / (sum(row) * per_expert[e]))
    return bits


def _rebalance(tokens: dict[str, int], model, workers: int) -> dict:
    """The gate's load on this text (max/mean per layer and per worker): one replica per expert placed without
    load stats, as a deployment starts; then as `moecluster rebalance` leaves it, the default replica budget
    (1.5x the experts) given to the hottest and placed by load, as the controller does."""
    shape = {layer: m.num_experts for layer, m in experts_modules(model).items()}
    load = {pair: float(tokens.get(expert_key(*pair), 0)) for pair in replica_counts(shape, {})}
    slots = [WorkerSlot(f"n{i}") for i in range(workers)]
    before = replica_counts(shape, {})
    after = rebalance_counts(load, math.ceil(1.5 * len(load)), workers)
    plans = {"before": (before, plan_placement(before, slots, 1)),
             "after": (after, plan_placement(after, slots, 1, load=load))}
    return {name: {"replicas": sum(counts.values()), "expert_max_over_mean": _replica_skew(load, counts, shape),
                   "worker_max_over_mean": _skew(worker_loads(plan, counts, load))}
            for name, (counts, plan) in plans.items()}


def _replica_skew(load: dict, counts: dict, shape: dict[int, int]) -> dict[int, float]:
    """Per layer, the busiest replica's tokens over the mean per replica."""
    return {layer: _skew([load[(layer, e)] / counts[(layer, e)] for e in range(n) for _ in range(counts[(layer, e)])])
            for layer, n in shape.items()}


def _skew(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean else 0.0


def _throughput(model, router, tokenizer, name: str, centroids, gen_tokens: int) -> float:
    from cluster.engine.engine import Engine
    from cluster.engine.sequence import SamplingParams

    router.policy = policy_for_model(model, name, centroids=centroids if name == "kmeans" else None)
    engine = Engine(model, tokenizer, model.config.max_position_embeddings, step_tokens=router.tokens,
                    background=False)
    started = time.perf_counter()
    outputs = engine.generate([tokenizer.encode(p) for p in REPORT_PROMPTS],
                              SamplingParams(gen_tokens, ignore_eos=True))
    return sum(map(len, outputs)) / (time.perf_counter() - started)


def format_report(report: dict) -> str:
    return "\n\n".join([format_policies(report), format_kinds(report), format_rebalance(report)])


def format_policies(report: dict) -> str:
    lines = [f"{report['tokens']} tokens; {report['workers']} workers",
             "| policy | top-k | capacity | perplexity | agreement | next-token acc | mean KL | expert max/mean "
             "| worker max/mean | decode tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        speed = report["decode_tokens_per_s"].get(r["policy"]) if r["top_k"] == report["rows"][0]["top_k"] \
            and r["capacity_factor"] is None else None
        lines.append(f"| {r['policy']} | {r['top_k']} | {r['capacity_factor'] or '-'} | {r['perplexity']:.2f} "
                     f"| {r['agreement']:.3f} | {r['next_token_accuracy']:.3f} | {r['mean_kl']:.3f} "
                     f"| {r['expert_max_over_mean']:.2f} | {r['worker_max_over_mean']:.2f} "
                     f"| {'-' if speed is None else f'{speed:.0f}'} |")
    return "\n".join(lines)


def format_kinds(report: dict, layers=None) -> str:
    out = []
    for layer, k in report["kinds"].items():
        if layers is not None and layer not in layers:
            continue
        experts = len(next(iter(k["share"].values())))
        lines = [f"layer {layer}: % of each kind's routes per expert (model gate; mutual information "
                 f"{k['mutual_information_bits']:.3f} bits)",
                 "| kind | tokens | " + " | ".join(f"e{e}" for e in range(experts)) + " |",
                 "|---|---|" + "---|" * experts]
        for kind, share in k["share"].items():
            lines.append(f"| {kind} | {k['tokens'][kind]} | " + " | ".join(f"{100 * s:.0f}" for s in share) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def format_rebalance(report: dict) -> str:
    r = report["rebalance"]
    layers = list(r["before"]["expert_max_over_mean"])
    lines = ["load skew (max/mean) of the model gate on this text, before and after a rebalance",
             "| | replicas | " + " | ".join(f"layer {layer}" for layer in layers) + " | workers |",
             "|---|---|" + "---|" * len(layers) + "---|"]
    for name in ("before", "after"):
        skew = r[name]["expert_max_over_mean"]
        lines.append(f"| {name} | {r[name]['replicas']} | " + " | ".join(f"{skew[layer]:.2f}" for layer in layers)
                     + f" | {r[name]['worker_max_over_mean']:.2f} |")
    return "\n".join(lines)
