"""`moecluster bench`: one workload played, in one run, through moecluster over gRPC, through moecluster's
engine with the experts in-process, and through transformers' `generate`; plus MoE-layer micro-benchmarks.
"""

import json
import os
import random
import socket
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from functools import partial

import torch

from experts.threads import usable_cores

# A served worker computes a layer once per decode step (by_layer), a step after its last call; a call after such
# a pause starts with cold caches (docs/performance.md), so the micro-benchmarks time one that way too.
PAUSE_S = 0.03
SMOKE = dict(streams=2, prompt_tokens=8, output_tokens=4, requests_per_stream=1, workers=2, micro_iters=3,
             stream_interval=2)


@dataclass(frozen=True)
class Workload:
    streams: int = 32
    prompt_tokens: int = 32
    output_tokens: int = 64
    requests_per_stream: int = 1
    arrival: str = "closed"  # closed: back to back; poisson: exponential think time, mean streams / rate
    rate: float = 0.0
    seed: int = 0

    def prompts(self, vocab_size: int) -> list[list[int]]:
        rng = random.Random(self.seed)
        count = self.streams * self.requests_per_stream
        return [[rng.randrange(3, vocab_size) for _ in range(self.prompt_tokens)] for _ in range(count)]

    def think_s(self, rng: random.Random) -> float:
        return rng.expovariate(self.rate / self.streams) if self.arrival == "poisson" and self.rate > 0 else 0.0


# --- load generation ---


def closed_loop(workload: Workload, prompts: list[list[int]], request) -> dict:
    """Each stream sends its requests one after another; `request(ids)` yields token counts as they come."""
    records, lock = [], threading.Lock()

    def stream(index: int) -> None:
        rng = random.Random(workload.seed + index)
        for r in range(workload.requests_per_stream):
            time.sleep(workload.think_s(rng))
            sent, arrivals = time.perf_counter(), []
            for n in request(prompts[index * workload.requests_per_stream + r]):
                arrivals.append((time.perf_counter() - sent, n))
            with lock:
                records.append(arrivals)

    started = time.perf_counter()
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(workload.streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(records, time.perf_counter() - started)


def summarize(records: list[list[tuple[float, int]]], wall_s: float) -> dict:
    tokens = sum(n for arrivals in records for _, n in arrivals)
    ttft = [a[0][0] for a in records if a]
    tpot = [(a[-1][0] - a[0][0]) / (sum(n for _, n in a) - a[0][1]) for a in records if sum(n for _, n in a) > a[0][1]]
    return {
        "requests": len(records), "output_tokens": tokens, "wall_s": wall_s, "output_tokens_per_s": tokens / wall_s,
        "ttft_ms": _percentiles(ttft), "tpot_ms": _percentiles(tpot),
    }


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    ordered = sorted(values)
    return {"p50": 1e3 * statistics.median(ordered), "p99": 1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


# --- the three systems ---


def grpc_requester(target: str, app: str, output_tokens: int):
    import grpc

    from cluster.serving.auth import client_metadata
    from protos import inference_pb2, inference_pb2_grpc

    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(target))

    def request(ids):
        message = inference_pb2.GenerateRequest(prompt_token_ids=ids, max_tokens=output_tokens, temperature=0,
                                                ignore_eos=True)
        for reply in stub.Generate(message, timeout=600, metadata=[("application", app), *client_metadata()]):
            yield len(reply.token_ids)

    return request


def engine_requester(engine, output_tokens: int):
    from cluster.engine.sequence import SamplingParams

    def request(ids):
        for event in engine.stream(ids, SamplingParams(output_tokens, ignore_eos=True)):
            yield len(event.token_ids)

    return request


def run_transformers(model_dir: str, workload: Workload, prompts: list[list[int]], threads: int,
                     dtype: str = "float32") -> dict:
    """transformers' generate on one static batch of all the prompts (left-padded), in this process."""
    from transformers import AutoModelForCausalLM

    from cluster.engine.kv_batch import left_padded

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    ids, mask = left_padded(prompts, pad_id=0)
    width = ids.shape[1]
    model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=2, do_sample=False)  # warm-up
    started = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=workload.output_tokens,
                         min_new_tokens=workload.output_tokens, do_sample=False, pad_token_id=0)
    wall = time.perf_counter() - started
    tokens = (out.shape[1] - width) * len(prompts)
    return {"requests": len(prompts), "output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall}


def run_inprocess(model_dir: str, workload: Workload, prompts: list[list[int]], threads: int, dtype: str) -> dict:
    """moecluster's engine with every expert in this process: no Ray actors, no gRPC."""
    from transformers import AutoTokenizer

    from cluster.engine.engine import Engine
    from router.local import attach_local_experts
    from router.model import load_dense_model
    from router.timings import per_call_ms

    torch.set_num_threads(threads)
    model = load_dense_model(model_dir, dtype)
    router = attach_local_experts(model, model_dir, None if dtype == "auto" else getattr(torch, dtype))
    engine = Engine(model, AutoTokenizer.from_pretrained(model_dir), model.config.max_position_embeddings)
    request = engine_requester(engine, workload.output_tokens)
    list(request(prompts[0][:4]))  # warm-up
    router.timings.drain()
    result = closed_loop(workload, prompts, request)
    result["moe_layer_ms"] = per_call_ms(router.timings.drain())
    return result


def run_distributed(model_dir: str, workload: Workload, prompts, config: dict, micro: dict | None):
    """The Serve application on a local Ray cluster, loaded over gRPC; then, on its workers, the micro-benchmarks."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from cluster.control import ops
    from cluster.node_env import apply_node_env
    from cluster.serving.app import GRPC_SERVICER, build
    from router.timings import PHASES, per_call_ms

    port = _free_port()
    apply_node_env()
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, config["num_workers"] + 2), include_dashboard=False,
             log_to_driver=False, namespace="moecluster")
    try:
        serve.start(http_options={"port": _free_port()},
                    grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[GRPC_SERVICER]))
        serve.run(build({"model": model_dir, **config}), name="bench", route_prefix="/bench")
        request = grpc_requester(f"127.0.0.1:{port}", "bench", workload.output_tokens)
        list(request(prompts[0][:4]))  # warm-up
        time.sleep(0.5)
        before = ops.status("bench")["layer_timings"]
        result = closed_loop(workload, prompts, request)
        time.sleep(0.5)  # the routers' last check-in
        after = ops.status("bench")["layer_timings"]
        result["moe_layer_ms"] = per_call_ms({k: after.get(k, 0) - before.get(k, 0) for k in ("calls", *PHASES)})
        if micro is not None:
            result["micro"] = run_micro(model_dir, "bench", config["dtype"], **micro)
        return result
    finally:
        serve.shutdown()
        ray.shutdown()


# --- micro-benchmarks ---


def run_micro(model_dir: str, app: str, dtype: str, iters: int = 30, token_counts=(32, 2048)) -> dict:
    """One MoE layer round trip (router -> workers -> router; over Unix sockets where the workers share this
    host, and over gRPC alone) against the same expert math in-process, back to back and, at the first token
    count, each call after a decode step's pause; and the expert GEMM's GFLOP/s against a bare matmul of the
    same shapes."""
    import ray

    from cluster.control.controller import controller_name
    from cluster.control.workers import NAMESPACE
    from experts.bank import ExpertBank
    from experts.layout import moe_shape
    from router.client import ExpertClient
    from router.local import LocalExperts
    from router.remote import ExpertRouter

    table = ray.get(ray.get_actor(controller_name(app), namespace=NAMESPACE).routing_table.remote())
    layer, experts = next(iter(moe_shape(model_dir).items()))
    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    bank = ExpertBank(model_dir, [(layer, e) for e in range(experts)], torch_dtype)
    routers = {"distributed": ExpertRouter(table, ExpertClient(timeout_s=60)),
               "distributed_grpc_only": ExpertRouter(table, ExpertClient(timeout_s=60, unix_sockets=False)),
               "in_process": ExpertRouter(_single_worker_table(table), LocalExperts([bank]))}
    hidden_size = _hidden_size(bank, layer)
    calls = {tokens: _layer_call(layer, experts, tokens, hidden_size, bank.dtype) for tokens in token_counts}
    out = {}
    for tokens, call in calls.items():
        times = {name: _time(partial(call, router), iters) for name, router in routers.items()}
        out[f"moe_layer_{tokens}_tokens_ms"] = {**times, "overhead_ms": times["distributed"] - times["in_process"]}
    call = calls[token_counts[0]]
    paused = {name: _time(partial(call, routers[name]), iters, pause_s=PAUSE_S) for name in ("distributed", "in_process")}
    out["moe_layer_after_pause_ms"] = {"tokens": token_counts[0], "pause_ms": 1e3 * PAUSE_S, **paused,
                                       "overhead_ms": paused["distributed"] - paused["in_process"]}
    out["expert_gemm"] = [gemm_efficiency(bank, layer, t, iters) for t in (256, 1024)]
    return out


def _layer_call(layer: int, experts: int, tokens: int, hidden_size: int, dtype: torch.dtype):
    """router -> one MoE layer call on `tokens` random rows, each sent to 2 random experts."""
    hidden = torch.randn(tokens, hidden_size, dtype=dtype)
    index = torch.stack([torch.randperm(experts)[:2] for _ in range(tokens)])
    weights = torch.full((tokens, 2), 0.5, dtype=dtype)
    return lambda router: router.forward(layer, hidden, index, weights)


def gemm_efficiency(bank, layer: int, tokens: int, iters: int) -> dict:
    module = bank.layers[layer].module
    gate_up, down = module.gate_up_proj[0], module.down_proj[0]
    if module.is_transposed:
        gate_up, down = gate_up.T, down.T
    x = torch.randn(tokens, gate_up.shape[1], dtype=bank.dtype)
    h = torch.randn(tokens, down.shape[1], dtype=bank.dtype)
    flops = 2 * tokens * gate_up.numel() + 2 * tokens * down.numel()
    expert = _time(lambda: bank.forward(layer, [bank.layers[layer].experts[0]], [tokens], x), iters)
    bare = _time(lambda: (torch.mm(x, gate_up.T), torch.mm(h, down.T)), iters)
    return {"tokens": tokens, "expert_gflops": flops / expert / 1e6, "bare_matmul_gflops": flops / bare / 1e6,
            "ratio": bare / expert}


def _single_worker_table(table):
    from router.table import RoutingTable

    return RoutingTable(0, {0: "local"}, {layer: [[0] for _ in hosts] for layer, hosts in table.replicas.items()})


def _hidden_size(bank, layer: int) -> int:
    module = bank.layers[layer].module
    return module.gate_up_proj.shape[1] if module.is_transposed else module.gate_up_proj.shape[2]


def _time(fn, iters: int, pause_s: float = 0.0) -> float:
    """Median milliseconds of `fn` over `iters` runs, after one warm-up, each run `pause_s` after the last."""
    fn()
    samples = []
    for _ in range(iters):
        time.sleep(pause_s)
        started = time.perf_counter()
        fn()
        samples.append(1e3 * (time.perf_counter() - started))
    return statistics.median(samples)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the whole run ---


def bench(model_dir: str, workload: Workload, workers: int, dtype: str = "float32", micro_iters: int = 30,
          baselines: bool = True, stream_interval: int = 1, placement: str = "auto") -> dict:
    from transformers import AutoConfig

    threads = usable_cores()
    prompts = workload.prompts(AutoConfig.from_pretrained(model_dir).vocab_size)
    config = {"num_workers": workers, "dtype": dtype, "stream_interval": stream_interval, "placement": placement}
    report = {"model": model_dir, "workload": asdict(workload), "threads": threads, **config}
    report["moecluster"] = run_distributed(model_dir, workload, prompts, config, {"iters": micro_iters})
    if baselines:
        report["inprocess"] = run_inprocess(model_dir, workload, prompts, threads, dtype)
        report["transformers"] = run_transformers(model_dir, workload, prompts, threads, dtype)
        ours = report["moecluster"]["output_tokens_per_s"]
        report["ratios"] = {
            "vs_transformers": ours / report["transformers"]["output_tokens_per_s"],
            "vs_inprocess": ours / report["inprocess"]["output_tokens_per_s"],
        }
    return report


def print_summary(report: dict) -> None:
    ours = report["moecluster"]
    print(f"moecluster  {ours['output_tokens_per_s']:8.1f} tok/s  TTFT p50 {ours['ttft_ms']['p50']:.1f} ms "
          f"p99 {ours['ttft_ms']['p99']:.1f} ms  TPOT p50 {ours['tpot_ms']['p50']:.1f} ms p99 {ours['tpot_ms']['p99']:.1f} ms")
    print("MoE layer ms per call: " + _phases(ours))
    for name in ("inprocess", "transformers"):
        if name in report:
            print(f"{name:<11} {report[name]['output_tokens_per_s']:8.1f} tok/s")
    if "inprocess" in report:
        print("in-process MoE layer ms per call: " + _phases(report["inprocess"]))
    if "ratios" in report:
        r = report["ratios"]
        print(f"ratios: {r['vs_transformers']:.2f}x transformers generate, {r['vs_inprocess']:.2f}x in-process engine")
    for key, value in ours.get("micro", {}).items():
        print(f"{key}: {json.dumps(value)}")


def _phases(result: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in result["moe_layer_ms"].items())
