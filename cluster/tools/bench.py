"""`moecluster bench`: one workload (long-tailed lengths by default) played, in one run, through moecluster
over gRPC at each worker count, through moecluster's engine with the experts in-process, and through
transformers (`generate` on static batches, and its continuous batching); the equal-length workload through
the engine and `generate`; plus MoE-layer micro-benchmarks against the floor of a hop.

Throughputs in output tokens/s, latencies in ms unless a key says `_us` (microseconds).
"""

import contextlib
import json
import multiprocessing
import os
import random
import socket
import statistics
import threading
import time
from dataclasses import asdict
from functools import partial

import torch

from cluster.tools.floor import echo_floor_us
from cluster.tools.workload import Lengths, Request, Workload, describe
from experts.threads import usable_cores

# A served worker computes a layer once per decode step (by_layer), a step after its last call; a call after such
# a pause starts with cold caches (docs/performance.md), so the micro-benchmarks time one that way too.
PAUSE_S = 0.03
SMOKE = dict(streams=2, requests_per_stream=1, prompt_tokens=8, output_tokens=4, prompt_lengths=Lengths(4, 8, 16),
             output_lengths=Lengths(2, 4, 8), workers=[2], micro_iters=3, stream_interval=2, scoring_prompts=4,
             scoring_tokens=16, long_prompts=1, long_prompt_tokens=48, engine_lanes=[1, 2])


# --- load generation ---


def closed_loop(workload: Workload, requests: list[Request], request) -> dict:
    """Each stream sends its requests one after another, the r-th of stream i being requests[r * streams + i]
    (the list is in arrival order); `request(r)` yields token counts as they come."""
    records, lock = [], threading.Lock()

    def stream(index: int) -> None:
        rng = random.Random(workload.seed + index)
        for r in range(workload.requests_per_stream):
            time.sleep(workload.think_s(rng))
            sent, arrivals = time.perf_counter(), []
            for n in request(requests[r * workload.streams + index]):
                arrivals.append((time.perf_counter() - sent, n))
            with lock:
                records.append(arrivals)

    started = time.perf_counter()
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(workload.streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {**summarize(records, time.perf_counter() - started), "load_1m": os.getloadavg()[0]}


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


# --- the systems ---


def grpc_requester(target: str, app: str):
    import grpc

    from cluster.serving.auth import client_metadata
    from protos import inference_pb2, inference_pb2_grpc

    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(target))

    def request(r: Request):
        message = inference_pb2.GenerateRequest(prompt_token_ids=r.prompt_ids, max_tokens=r.output_tokens,
                                                temperature=0, ignore_eos=True)
        for reply in stub.Generate(message, timeout=600, metadata=[("application", app), *client_metadata()]):
            yield len(reply.token_ids)

    return request


def engine_requester(engine):
    from cluster.engine.sequence import SamplingParams

    def request(r: Request):
        for event in engine.stream(r.prompt_ids, SamplingParams(r.output_tokens, ignore_eos=True)):
            yield len(event.token_ids)

    return request


def inprocess_engine(model_dir: str, threads: int, dtype: str, max_batch_size: int):
    """moecluster's engine with every expert in this process: no Ray actors, no gRPC; (engine, its router)."""
    from transformers import AutoTokenizer

    from cluster.engine.engine import Engine
    from router.local import attach_local_experts
    from router.model import load_dense_model

    torch.set_num_threads(threads)
    model = load_dense_model(model_dir, dtype)
    router = attach_local_experts(model, model_dir, None if dtype == "auto" else getattr(torch, dtype))
    engine = Engine(model, AutoTokenizer.from_pretrained(model_dir), model.config.max_position_embeddings,
                    max_batch_size)
    list(engine_requester(engine)(Request([5, 6, 7, 8], 2)))  # warm-up
    return engine, router


def run_inprocess(engine, router, workload: Workload, requests: list[Request]) -> dict:
    from router.timings import per_call_ms

    router.timings.drain()
    result = closed_loop(workload, requests, engine_requester(engine))
    result["moe_layer_ms"] = per_call_ms(router.timings.drain())
    return result


def run_engine_alone(model_dir: str, plays: list[tuple], threads: int, dtype: str, max_batch_size: int,
                     schedule: dict) -> tuple[list[dict], dict]:
    """The in-process engine on each play, then its schedule measured (schedule_bench.run_schedule's `schedule`
    options), in a process of its own with the serving replica's environment (ACTOR_ENV): OpenMP reads its wait
    policy once per process, and the engine is to run as it serves, while transformers runs in this process as
    its users run it."""
    from cluster.node_env import ACTOR_ENV

    with _environment(ACTOR_ENV):
        pool = multiprocessing.get_context("spawn").Pool(1)  # the child takes the environment as it starts
    with pool:
        return pool.apply(_engine_runs, (model_dir, plays, threads, dtype, max_batch_size, schedule))


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _engine_runs(model_dir: str, plays: list[tuple], threads: int, dtype: str, max_batch_size: int,
                 schedule: dict) -> tuple[list[dict], dict]:
    from cluster.tools.schedule_bench import run_schedule

    engine, router = inprocess_engine(model_dir, threads, dtype, max_batch_size)
    try:
        return [run_inprocess(engine, router, *play) for play in plays], run_schedule(engine, **schedule)
    finally:
        engine.close()


def run_distributed(model_dir: str, workload: Workload, requests: list[Request], config: dict, micro: dict | None,
                    scoring: list[list[int]] | None = None, timeline: dict | None = None):
    """The Serve application on a local Ray cluster, loaded over gRPC; then, on its workers, the micro-benchmarks,
    the `scoring` prompts scored over HTTP (cluster/tools/scoring.py) and one decode step's `timeline`
    (cluster/tools/step_timeline.py)."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from cluster.control import ops
    from cluster.node_env import apply_node_env
    from cluster.serving.app import build
    from cluster.serving.grpc_api import SERVICERS
    from router.timings import PHASES, per_call_ms

    port, http_port = _free_port(), _free_port()
    apply_node_env()
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, config["num_workers"] + 2), include_dashboard=False,
             log_to_driver=False, namespace="moecluster")
    try:
        serve.start(http_options={"port": http_port},
                    grpc_options=gRPCOptions(port=port, grpc_servicer_functions=SERVICERS))
        serve.run(build({"model": model_dir, **config}), name="bench", route_prefix="/bench")
        request = grpc_requester(f"127.0.0.1:{port}", "bench")
        list(request(Request([5, 6, 7, 8], 2)))  # warm-up
        time.sleep(0.5)
        before = ops.status("bench")["layer_timings"]
        result = closed_loop(workload, requests, request)
        time.sleep(0.5)  # the routers' last check-in
        after = ops.status("bench")["layer_timings"]
        result["moe_layer_ms"] = per_call_ms({k: after.get(k, 0) - before.get(k, 0) for k in ("calls", *PHASES)})
        if micro is not None:
            result["micro"] = run_micro(model_dir, "bench", config["dtype"], **micro)
        if scoring is not None:
            from cluster.tools.scoring import run_scoring

            result["scoring"] = run_scoring(f"http://127.0.0.1:{http_port}/bench", None, scoring)
        if timeline is not None:
            from cluster.tools.step_timeline import run_timeline

            result["timeline"] = run_timeline(model_dir, "bench", config["dtype"], **timeline)
        return result
    finally:
        serve.shutdown()
        ray.shutdown()


# --- micro-benchmarks ---


def run_micro(model_dir: str, app: str, dtype: str, iters: int = 30, token_counts=(32, 2048)) -> dict:
    """One MoE layer round trip (router -> workers -> router; over Unix sockets where the workers share this
    host, and over gRPC alone) against the same expert math in-process, back to back and, at the first token
    count, each call after a decode step's pause, both against the floor of a hop with that call's bytes; and
    the expert GEMM's GFLOP/s against a bare matmul of the same shapes."""
    import ray

    from cluster.control import ops
    from experts.bank import ExpertBank
    from experts.layout import moe_shape
    from router.client import ExpertClient
    from router.local import LocalExperts
    from router.remote import ExpertRouter

    controller = ops.controllers(app)[0]
    table = ray.get(controller.routing_table.remote())
    layer, experts = next(iter(moe_shape(model_dir).items()))
    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    bank = ExpertBank(model_dir, [(layer, e) for e in range(experts)], torch_dtype)
    key = ray.get(controller.data_path_key.remote())
    routers = {"distributed": ExpertRouter(table, ExpertClient(timeout_s=60, key=key)),
               "distributed_grpc_only": ExpertRouter(table, ExpertClient(timeout_s=60, key=key, unix_sockets=False)),
               "in_process": ExpertRouter(_single_worker_table(table), LocalExperts([bank]))}
    hidden_size, top_k = _hidden_size(bank, layer), _top_k(model_dir)
    calls = {tokens: _layer_call(layer, experts, tokens, hidden_size, bank.dtype, top_k) for tokens in token_counts}
    out = {}
    for tokens, call in calls.items():
        times = {name: _time(partial(call, router), iters) for name, router in routers.items()}
        out[f"moe_layer_{tokens}_tokens_ms"] = {**times, "overhead_ms": times["distributed"] - times["in_process"]}
    call = calls[token_counts[0]]
    paused = {name: _time(partial(call, routers[name]), iters, pause_s=PAUSE_S) for name in ("distributed", "in_process")}
    out["moe_layer_after_pause_ms"] = {"tokens": token_counts[0], "pause_ms": 1e3 * PAUSE_S, **paused,
                                       "overhead_ms": paused["distributed"] - paused["in_process"]}
    first = out[f"moe_layer_{token_counts[0]}_tokens_ms"]
    trips_ms = {"back_to_back": (first["distributed"], first["in_process"]),
                "after_pause": (paused["distributed"], paused["in_process"])}
    out.update(hop_floor(trips_ms, token_counts[0] * top_k * hidden_size * bank.dtype.itemsize, iters))
    out["expert_gemm"] = [gemm_efficiency(bank, layer, t, iters) for t in (256, 1024)]
    return out


def hop_floor(trips_ms: dict, payload_bytes: int, iters: int) -> dict:
    """The socket echo of `payload_bytes` each way (a layer call's rows out, its expert outputs back), back to back
    and after a pause; and by how many microseconds each (distributed, in-process) round trip of `trips_ms` lies
    above it: the whole distributed trip (expert math included), and its overhead over in-process."""
    floor = {"back_to_back": echo_floor_us(payload_bytes, iters), "after_pause": echo_floor_us(payload_bytes, iters, PAUSE_S)}
    return {"hop_floor_us": {"payload_bytes": payload_bytes, **floor},
            "hop_over_floor_us": {k: 1e3 * trips_ms[k][0] - floor[k] for k in floor},
            "overhead_over_floor_us": {k: 1e3 * (trips_ms[k][0] - trips_ms[k][1]) - floor[k] for k in floor}}


def _layer_call(layer: int, experts: int, tokens: int, hidden_size: int, dtype: torch.dtype, top_k: int):
    """router -> one MoE layer call on `tokens` random rows, each sent to `top_k` random experts."""
    hidden = torch.randn(tokens, hidden_size, dtype=dtype)
    index = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    weights = torch.full((tokens, top_k), 1 / top_k, dtype=dtype)
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


def _top_k(model_dir: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).num_experts_per_tok


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


def bench(model_dir: str, workload: Workload, workers: list[int], dtype: str = "float32", micro_iters: int = 30,
          baselines: bool = True, stream_interval: int = 1, placement: str = "auto",
          equal: Workload | None = None, scoring_prompts: int = 32, scoring_tokens: int = 200,
          long_prompts: int = 4, long_prompt_tokens: int = 900, engine_lanes: tuple[int, ...] = (1,)) -> dict:
    """`workload` served at each worker count (the micro-benchmarks and the scoring at the largest) and through
    the peers; `equal` (default: `workload` if it is equal-length) through the in-process engine and `generate`;
    scoring: `scoring_prompts` prompts of `scoring_tokens` tokens in one request, one request per prompt, and
    transformers' forward; the engine's schedule: streams' gaps while `long_prompts` prompts of
    `long_prompt_tokens` tokens arrive, whole and in chunks, and a cached prefix's time to first token. The served
    runs step `engine_lanes[0]` micro-batches; each further count is served again at every worker count
    (`overlap`)."""
    from transformers import AutoConfig

    from cluster.config import ServeConfig
    from cluster.tools.scoring import scoring_prompts as make_scoring

    threads, max_batch_size = usable_cores(), ServeConfig.model_fields["max_batch_size"].default
    vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
    requests = workload.requests(vocab_size)
    serving = {"dtype": dtype, "stream_interval": stream_interval, "placement": placement,
               "engine_lanes": engine_lanes[0]}
    report = {"model": model_dir, "workload": {**asdict(workload), "lengths": describe(requests)}, "threads": threads,
              "workers": workers, "max_batch_size": max_batch_size, **serving}
    micro = {"iters": micro_iters}
    scoring = make_scoring(vocab_size, scoring_prompts, scoring_tokens, workload.seed)
    timeline = {"lanes": tuple(sorted({1, 2, *engine_lanes})), "streams": workload.streams, "threads": threads}
    report["moecluster"] = {str(n): run_distributed(
        model_dir, workload, requests, {"num_workers": n, **serving},
        *((micro, scoring, timeline) if n == max(workers) else (None, None, None))) for n in workers}
    report["overlap"] = {str(lanes): {str(n): _served_only(run_distributed(
        model_dir, workload, requests, {"num_workers": n, **serving, "engine_lanes": lanes}, None))
        for n in workers} for lanes in engine_lanes[1:]}
    largest = report["moecluster"][str(max(workers))]
    report["micro"], report["scoring"] = largest.pop("micro"), largest.pop("scoring")
    report["timeline"] = {"workers": max(workers), **largest.pop("timeline")}
    if baselines:
        played = (workload, requests)
        equal_played = played if equal is None or workload.kind == "equal" else (equal, equal.requests(vocab_size))
        schedule = {"chunk_tokens": ServeConfig.model_fields["prefill_chunk_tokens"].default,
                    "long_prompts": long_prompts, "long_tokens": long_prompt_tokens,
                    "prefix_tokens": min(512, long_prompt_tokens)}
        report.update(run_peers(model_dir, played, equal_played, threads, dtype, max_batch_size, schedule, scoring))
        report["ratios"] = ratios(report)
    return report


def _served_only(result: dict) -> dict:
    """What the overlap runs report: throughput and where a MoE layer call's time goes."""
    return {"output_tokens_per_s": result["output_tokens_per_s"], "moe_layer_ms": result["moe_layer_ms"]}


def run_peers(model_dir: str, played: tuple, equal_played: tuple, threads: int, dtype: str,
              max_batch_size: int, schedule: dict, scoring: list[list[int]]) -> dict:
    """The in-process engine and transformers on `played` (workload, requests), and the engine and `generate`
    on `equal_played` (the same runs if it is the same); the engine's `schedule`; transformers' forward over the
    `scoring` prompts."""
    from cluster.tools import peers
    from cluster.tools.scoring import transformers_scoring

    plays = [played] if equal_played is played else [played, equal_played]
    inprocess, scheduled = run_engine_alone(model_dir, plays, threads, dtype, max_batch_size, schedule)
    model = peers.load(model_dir, threads, dtype)
    static = [peers.run_static(model, p[1], max_batch_size) for p in plays]
    return {"inprocess": inprocess[0], "transformers": static[0],
            "transformers_continuous": peers.run_continuous(model, played[1], max_batch_size),
            "equal": {"workload": asdict(equal_played[0]), "inprocess": inprocess[-1], "transformers": static[-1]},
            "schedule": scheduled, "transformers_scoring": transformers_scoring(model, scoring)}


def ratios(report: dict) -> dict:
    """Throughput ratios: served (at the largest worker count unless `_by_workers`) over each peer, and the
    in-process engine over transformers `generate` on the equal-length workload."""
    tps = {name: report[name]["output_tokens_per_s"] for name in ("inprocess", "transformers")}
    served = {n: result["output_tokens_per_s"] for n, result in report["moecluster"].items()}
    top = served[str(max(report["workers"]))]
    equal = report["equal"]
    out = {"vs_transformers": top / tps["transformers"], "vs_inprocess": top / tps["inprocess"],
           "vs_transformers_by_workers": {n: s / tps["transformers"] for n, s in served.items()},
           "vs_inprocess_by_workers": {n: s / tps["inprocess"] for n, s in served.items()},
           "overlap_vs_inprocess_by_workers": {lanes: {n: r["output_tokens_per_s"] / tps["inprocess"]
                                                       for n, r in runs.items()}
                                               for lanes, runs in report.get("overlap", {}).items()},
           "inprocess_vs_transformers": equal["inprocess"]["output_tokens_per_s"]
           / equal["transformers"]["output_tokens_per_s"],
           "inprocess_vs_transformers_realistic": tps["inprocess"] / tps["transformers"]}
    out.update(_scoring_and_schedule_ratios(report))
    continuous = report["transformers_continuous"]
    if not continuous.get("skipped"):
        out["vs_transformers_continuous"] = top / continuous["output_tokens_per_s"]
        out["inprocess_vs_transformers_continuous"] = tps["inprocess"] / continuous["output_tokens_per_s"]
    return out


def _scoring_and_schedule_ratios(report: dict) -> dict:
    schedule, scoring = report["schedule"], report["scoring"]
    return {"scoring_batched_vs_one_by_one": scoring["batched_speedup"],
            "scoring_vs_transformers_forward": scoring["batched_tok_s"] / report["transformers_scoring"]["tok_s"],
            "stream_gap_max_over_p50": {name: schedule[name]["max_over_p50"] for name in ("whole", "chunked")},
            "chunked_throughput_vs_whole": schedule["chunked_throughput_ratio"],
            "cached_prefix_ttft_speedup": schedule["prefix"]["speedup"]}


def print_summary(report: dict) -> None:
    lengths = report["workload"]["lengths"]
    print(f"{report['workload']['kind']} workload: {lengths['requests']} requests, prompt tokens p50/max "
          f"{lengths['prompt_tokens']['p50']}/{lengths['prompt_tokens']['max']}, output tokens p50/max "
          f"{lengths['output_tokens']['p50']}/{lengths['output_tokens']['max']}")
    for workers, result in report["moecluster"].items():
        print(f"moecluster, {workers} workers {_throughput(result)}  TTFT p50 {result['ttft_ms']['p50']:.1f} "
              f"p99 {result['ttft_ms']['p99']:.1f} ms  TPOT p50 {result['tpot_ms']['p50']:.1f} "
              f"p99 {result['tpot_ms']['p99']:.1f} ms")
        print("  MoE layer ms per call: " + _phases(result))
    for lanes, runs in report["overlap"].items():
        for workers, result in runs.items():
            print(f"moecluster, {workers} workers, {lanes} lanes in ping-pong {_throughput(result)}  MoE layer ms per "
                  "call: " + _phases(result))
    if "ratios" in report:
        _print_peers(report)
    scoring = report["scoring"]
    print(f"scoring {scoring['prompts']} prompts: one request {scoring['batched_tok_s']:.0f} tok/s, one request "
          f"per prompt {scoring['one_by_one_tok_s']:.0f} tok/s ({scoring['batched_speedup']:.2f}x)")
    for key, value in report["micro"].items():
        print(f"{key}: {json.dumps(value)}")
    _print_timeline(report["timeline"])


def _print_timeline(timeline: dict) -> None:
    steps = {lanes: step for lanes, step in timeline.items() if lanes != "workers"}
    legend = next(iter(steps.values()))["legend"]
    print(f"one decode step at {timeline['workers']} workers, per micro-batch ("
          + ", ".join(f"{mark} {phase}" for mark, phase in legend.items()) + "):")
    for lanes, step in steps.items():
        print(f"  {lanes} micro-batches, {step['step_ms']:.1f} ms")
        for i, row in enumerate(step["chart"]):
            totals = "  ".join(f"{phase} {ms:.1f}" for phase, ms in step["per_micro_batch_ms"][i].items())
            print(f"    |{row}|  {totals}")


def _print_peers(report: dict) -> None:
    print(f"in-process engine {_throughput(report['inprocess'])}  MoE layer ms per call: "
          + _phases(report["inprocess"]))
    print(f"transformers generate, static batches of {report['transformers']['batch_size']} "
          f"{_throughput(report['transformers'])}")
    continuous = report["transformers_continuous"]
    print("transformers continuous batching " + (f"skipped: {continuous['error']}" if continuous.get("skipped")
                                                 else _throughput(continuous)))
    equal = report["equal"]
    print(f"equal-length ({equal['workload']['streams']} streams): in-process {_throughput(equal['inprocess'])}, "
          f"transformers generate {_throughput(equal['transformers'])}")
    print(f"transformers forward over the scoring prompts {report['transformers_scoring']['tok_s']:.0f} tok/s")
    schedule = report["schedule"]
    for name in ("whole", "chunked"):
        gaps = schedule[name]
        print(f"streams while long prompts arrive, {name}: gap p50 {gaps['gap_p50_ms']:.1f} ms, max "
              f"{gaps['gap_max_ms']:.1f} ms ({gaps['max_over_p50']:.1f}x), {gaps['decode_tok_s']:.0f} tok/s")
    prefix = schedule["prefix"]
    print(f"a {prefix['prefix_tokens']}-token cached prefix: TTFT {prefix['first_ttft_ms']:.1f} -> "
          f"{prefix['cached_ttft_ms']:.1f} ms")
    print("ratios: " + ", ".join(f"{k} {json.dumps(v)}" for k, v in _rounded(report["ratios"]).items()))


def _throughput(result: dict) -> str:
    return f"{result['output_tokens_per_s']:8.1f} tok/s"


def _rounded(value):
    return {k: _rounded(v) for k, v in value.items()} if isinstance(value, dict) else round(value, 2)


def _phases(result: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in result["moe_layer_ms"].items())
