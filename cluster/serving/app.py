"""The Ray Serve application: the assembled model behind an OpenAI-compatible HTTP API and a gRPC API."""

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import os
import threading
import time
import uuid

import ray
import torch
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2
from ray import serve
from transformers import AutoTokenizer

from cluster.config import ServeConfig, live_fields, version_args, with_live
from cluster.control.controller import CONTROLLER, RouterReport, controller_actor
from cluster.engine import kv_budget
from cluster.engine.engine import Engine
from cluster.engine.sequence import Event, SamplingParams, Sequence
from cluster.errors import ModelNotFound, ServingError, UnknownService
from cluster.serving import chat, grpc_api, metrics, stream
from cluster.serving.auth import ENV as AUTH_ENV
from cluster.serving.auth import ApiKeys
from cluster.serving.body_limit import BodyLimit
from cluster.serving.chat import ChatRequest
from cluster.serving.logs import one_line_refusals
from cluster.serving.metrics import RequestTimer, ServingMetrics
from cluster.serving.openai_api import (
    CompletionRequest,
    completion_body,
    completion_choice,
    completion_id,
    completion_logprobs,
    echoed,
    error_body,
    usage,
    validation_message,
)
from cluster.serving.replica import PROBE_TIMEOUT_S, REPLICA_ACTOR, served_model_name
from cluster.serving.requests import check_prompt_count, choice_params, parse_prompt, parse_sampling
from cluster.serving.rollout import autoscaling_options, rollout_surge
from cluster.serving.router_policies import call_deadlines, hedge_policy, routing_policy
from experts.threads import usable_cores
from protos import inference_pb2
from protos.wire.unix_stream import FrameLimits
from router.client import ExpertClient
from router.model import load_dense_model
from router.remote import ExpertRouter
from router.seam import route_experts

log = logging.getLogger(__name__)
api = FastAPI(title="moecluster")
api.add_middleware(BodyLimit)
REPORT_INTERVAL_S = 0.2
METRICS_EVERY = 5  # reports: how often a replica's metrics go to the controller, for scrapes of another replica
READ = ["GET", "HEAD"]  # benchmark tools probe a route with HEAD before they GET it


@api.exception_handler(RequestValidationError)
async def _bad_body(request: Request, error: RequestValidationError):
    message = f"invalid request body: {validation_message(error.errors())}"
    log.info("rejected request: %s", message)
    return JSONResponse(error_body(message, 400), status_code=400)


@api.exception_handler(ServingError)
async def _serving_error(request: Request, error: ServingError):
    return JSONResponse(error_body(str(error), error.http_status, error.code), status_code=error.http_status)


@dataclasses.dataclass(frozen=True)
class Job:
    """One sequence a request asks for: a prompt's one choice."""

    prompt_ids: list[int]
    params: SamplingParams


def _json(body: dict) -> Response:
    """`body` as JSON, without FastAPI's encoder, which walks every value of a large answer (a scored batch)."""
    return Response(json.dumps(body), media_type="application/json")


def _deliver(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, event: Event) -> None:
    """The engine's thread hands an event to the request's event loop."""
    loop.call_soon_threadsafe(queue.put_nowait, event)


async def _tokens(events: asyncio.Queue, timer: RequestTimer):
    """One sequence's events until its last; a failed step's error is raised."""
    try:
        while True:
            event = await stream.ready(events)
            timer.add(len(event.token_ids), event.finish_reason)
            yield event
            if event.finish_reason:
                return
    except ServingError as error:
        timer.failed(error.grpc_code.name)
        raise


@serve.deployment(max_ongoing_requests=1024, ray_actor_options=REPLICA_ACTOR)
@serve.ingress(api)
class MoEServer:
    def __init__(self, version: dict):
        """`version`: the version's fields of the serving config (`config.version_args`); Serve then calls
        `reconfigure` with the live ones before the replica takes a request."""
        self._version = version
        self.config = with_live(version, {})
        one_line_refusals()
        torch.set_num_threads(self.config.serving_threads or usable_cores())
        self.controller = serve.get_deployment_actor(CONTROLLER)
        self.model_dir = ray.get(self.controller.model_ref.remote()).local()
        self._created = int(time.time())
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.model = load_dense_model(self.model_dir, self.config.dtype, device)
        self._router_id = serve.get_replica_context().replica_id.unique_id
        client = ExpertClient(self.config.expert_timeout_s, ray.get(self.controller.data_path_key.remote()),
                              limits=FrameLimits.of(self.config.limits))
        self.router = ExpertRouter(ray.get(self.controller.attach.remote(self._router_id)), client,
                                   probe_timeout_s=min(self.config.expert_timeout_s, PROBE_TIMEOUT_S))
        route_experts(self.model, self.router)
        self.context_len = self.model.config.max_position_embeddings
        self._free_bytes = kv_budget.free_bytes(self.model.device)  # before any cache: what the budgets share
        self.engine = Engine(self.model, self.tokenizer, self.context_len, self.config.max_batch_size,
                             self.config.max_waiting, step_tokens=self.router.tokens,
                             lanes=self.config.engine_lanes)
        self.connections = grpc_api.ConnectionStreams(self.config.limits.streams_per_connection)
        self.model_name = served_model_name(self.config, self.model_dir)
        self.metrics = ServingMetrics(self.model_name, self.config.metrics_expert_series,
                                      running=self.engine.running, waiting=self.engine.waiting,
                                      cache=self.engine.cache_stats)
        self.router.client.on_reply = lambda worker, s: self.metrics.forward_seconds.labels(str(worker)).observe(s)
        self._experts_per_layer = {layer: len(hosts) for layer, hosts in self.router.table.replicas.items()}
        self._node_id = ray.get_runtime_context().get_node_id()
        threading.Thread(target=self._report_loop, name="router-report", daemon=True).start()

    def __del__(self):
        # Serve calls this on a graceful shutdown, once the replica's requests are done: the last replica of its
        # version releases the version's workers and their placement group.
        self.router.close()
        try:
            ray.get(self.controller.release.remote(self._router_id), timeout=30)
        except Exception:
            log.exception("could not release the expert workers")

    def reconfigure(self, live: dict) -> None:
        """Serve's in-place update: the live fields of the serving config (`cluster.config.LIVE_FIELDS`), applied
        to the requests that start from now on, with no restart."""
        config = with_live(self._version, live)
        self.keys = ApiKeys.load(config.api_keys_file)
        if self.keys.open:
            log.warning("no API key is set (%s or api_keys_file): anyone who reaches the APIs can use them", AUTH_ENV)
        BodyLimit.max_bytes = config.limits.max_body_bytes
        self.connections.limit = config.limits.streams_per_connection
        self.router.policy = routing_policy(self.model, self.model_dir, config.routing)
        self.router.hedging = hedge_policy(config.hedge)
        self.router.deadlines = call_deadlines(config)
        self.router.client.timeout_s = config.expert_timeout_s
        self.engine.max_batch_size = config.max_batch_size
        self.engine.resize_queue(config.max_waiting)
        kv_tokens = config.kv_cache_tokens or kv_budget.positions_in(
            self._free_bytes, config.kv_cache_memory_fraction, self.model)
        prefix_tokens = kv_tokens // 4 if config.prefix_cache_tokens is None else config.prefix_cache_tokens
        # after the new routing is in place: a prefill begun before this keeps its KV out of the new cache
        self.engine.schedule(config.prefill_chunk_tokens, kv_tokens, prefix_tokens,
                             forget_prefixes=config.routing != self.config.routing)
        self.config = config
        ray.get(self.controller.set_live.remote(live), timeout=self.config.startup_timeout_s)

    def _report_loop(self) -> None:
        reachable = True
        for count in itertools.count():
            time.sleep(REPORT_INTERVAL_S)
            experts, workers = self.router.drain()
            counters = self.router.drain_counters()
            self.metrics.add_expert_tokens(experts, self._experts_per_layer)
            self.metrics.add_health(counters)
            self.metrics.set_replicas(self.router.table.replicas)
            report = RouterReport(
                self._router_id, self._node_id, os.getpid(), self.router.table.version, experts, workers,
                self.router.timings.drain(), counters, sorted(self.router.health.ejected()),
                self.metrics.render() if count % METRICS_EVERY == 0 else None)
            try:
                table = ray.get(self.controller.report.remote(report), timeout=10)
            except ray.exceptions.RayError as error:  # a restarting controller: serve on with the last routing table
                if reachable:
                    log.warning("expert controller unreachable, serving with routing table v%d: %s",
                                self.router.table.version, type(error).__name__)
                reachable = False
                self._find_controller()
                continue
            if not reachable:
                log.warning("expert controller reachable again")
            reachable = True
            if table is not None:
                self.router.update(table)

    def _find_controller(self) -> None:
        """The version's controller once Serve has started it again (a handle to a dead one stays dead)."""
        try:
            self.controller = serve.get_deployment_actor(CONTROLLER)
        except ValueError:
            pass  # not registered again yet

    def _prompt_ids(self, prompts: list[str | list[int]], add_special_tokens: bool) -> list[list[int]]:
        check_prompt_count(len(prompts), self.config.limits)
        return [parse_prompt(p, name=f"prompt[{i}]" if len(prompts) > 1 else "prompt", tokenizer=self.tokenizer,
                             vocab_size=self.model.config.vocab_size, context_len=self.context_len,
                             limits=self.config.limits, add_special_tokens=add_special_tokens)
                for i, p in enumerate(prompts)]

    def _jobs(self, prompt_ids: list[list[int]], n: int, **sampling) -> list[Job]:
        """A sequence to generate for each prompt's each choice: prompt i's choice j is job i * n + j."""
        params = parse_sampling(**sampling, vocab_size=self.model.config.vocab_size, context_len=self.context_len,
                                default_max_tokens=self.config.default_max_tokens, limits=self.config.limits)
        each = choice_params(params, n, self.config.limits.max_n)
        return [Job(ids, choice) for ids in prompt_ids for choice in each]

    async def _choices(self, jobs: list[Job]):
        """(index of its job, event) for every job's events as they come. The jobs join a batch together, and all
        leave it when this closes early (the client went away)."""
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in jobs]
        sequences = [Sequence(job.prompt_ids, job.params, functools.partial(_deliver, loop, queue))
                     for job, queue in zip(jobs, queues)]
        timers = [RequestTimer(self.metrics, len(job.prompt_ids)) for job in jobs]
        try:
            self.engine.submit_all(sequences)
        except ServingError as error:
            for timer in timers:
                timer.failed(error.grpc_code.name)
            raise
        try:
            streams = [stream.every(_tokens(queue, timer), self.config.stream_interval)
                       for queue, timer in zip(queues, timers)]
            async with contextlib.aclosing(stream.interleave(streams)) as events:
                async for item in events:
                    yield item
        finally:
            for sequence in sequences:
                sequence.cancelled = True  # the client left early: free its batch slots

    # --- gRPC: moecluster.v1.Inference ---

    async def Generate(self, request: inference_pb2.GenerateRequest, grpc_context=None):
        try:
            if grpc_context is not None:
                self.keys.check(dict(grpc_context.invocation_metadata()).get("authorization"))
            asked = grpc_api.generation(request)
            jobs = self._jobs(self._prompt_ids(asked.prompts, asked.add_special_tokens), asked.n, **asked.sampling)
            with self.connections.held(grpc_context.peer() if grpc_context is not None else None):
                async with contextlib.aclosing(self._choices(jobs)) as events:
                    async for index, event in events:
                        yield grpc_api.response(index, event)
        except ServingError as error:
            grpc_api.set_status(grpc_context, error)
            raise

    # --- gRPC: grpc.health.v1.Health, for probes and load balancers (open, as /health is) ---

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None):
        return health_pb2.HealthCheckResponse(status=self._serving(request.service, grpc_context))

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context=None):
        yield health_pb2.HealthCheckResponse(status=self._serving(request.service, grpc_context))
        await asyncio.Event().wait()  # a replica that answers is serving: nothing changes until it goes away

    def _serving(self, service: str, grpc_context):
        if service not in ("", grpc_api.SERVICE):
            error = UnknownService(f"no service {service!r} here; ask for {grpc_api.SERVICE!r} or the server ('')")
            grpc_api.set_status(grpc_context, error)
            raise error
        return health_pb2.HealthCheckResponse.SERVING

    # --- HTTP: OpenAI-compatible ---

    @api.api_route("/health", methods=READ)
    def health(self):
        return {"status": "ok"}

    @api.api_route("/metrics", methods=READ)
    def prometheus(self, authorization: str | None = Header(None)):
        if not self.config.metrics_open:
            self.keys.check(authorization)
        return Response(self._every_replicas_metrics(), media_type=metrics.CONTENT_TYPE)

    def _every_replicas_metrics(self) -> bytes:
        try:
            others = ray.get(self.controller.replica_metrics.remote(), timeout=5)
        except ray.exceptions.RayError:  # a restarting controller: this replica's own
            others = {}
        return metrics.merge_replicas({**others, self._router_id: self.metrics.render()})

    @api.api_route("/v1/models", methods=READ)
    def models(self, authorization: str | None = Header(None)):
        self.keys.check(authorization)
        return {"object": "list", "data": [self._model_card()]}

    @api.api_route("/v1/models/{model_id:path}", methods=READ)
    def model(self, model_id: str, authorization: str | None = Header(None)):
        self.keys.check(authorization)
        self._check_model(model_id)
        return self._model_card()

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self._created, "owned_by": "moecluster"}

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ModelNotFound(f"the model {model!r} does not exist here; this server serves {self.model_name!r}")

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, authorization: str | None = Header(None)):
        self.keys.check(authorization)
        self._check_model(body.model)
        prompts = body.prompts()
        prompt_ids = self._prompt_ids(prompts, body.add_special_tokens)
        jobs = self._jobs(prompt_ids, body.n, **body.sampling(), max_tokens=body.max_tokens, logprobs=body.logprobs,
                          echo=body.echo)
        echoes = [(p if isinstance(p, str) else self.tokenizer.decode(ids)) if body.echo else None
                  for p, ids in zip(prompts, prompt_ids) for _ in range(body.n)]
        cid, model = completion_id(), self.model_name
        if body.stream:
            return StreamingResponse(self._sse(cid, model, jobs, echoes, sum(map(len, prompt_ids)),
                                               *body.usage_in_stream()),
                                     media_type="text/event-stream")
        choices, generated = [], 0
        with_logprobs = body.logprobs is not None
        for index, (whole, echo) in enumerate(zip(await self._wholes(jobs), echoes)):
            text, logprobs = echoed(whole, echo, with_logprobs)
            choices.append(completion_choice(index, text, whole.token_ids, whole.finish_reason,
                                             completion_logprobs(self.tokenizer, logprobs)))
            generated += len(whole.token_ids)
        return _json(completion_body(cid, model, choices, usage(sum(map(len, prompt_ids)), generated)))

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatRequest, authorization: str | None = Header(None)):
        self.keys.check(authorization)
        self._check_model(body.model)
        prompt_ids = self._prompt_ids([chat.render(self.tokenizer, body.messages)], add_special_tokens=False)
        jobs = self._jobs(prompt_ids, body.n, **body.sampling(), max_tokens=body.token_budget(),
                          logprobs=body.alternatives())
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return StreamingResponse(self._chat_sse(cid, created, jobs, *body.usage_in_stream()),
                                     media_type="text/event-stream")
        wholes = await self._wholes(jobs)
        choices = [chat.chat_choice(i, w.text, w.token_ids, w.finish_reason, chat.chat_logprobs(self.tokenizer, w.logprobs))
                   for i, w in enumerate(wholes)]
        return _json(chat.chat_body(cid, self.model_name, created, choices,
                                    usage(len(prompt_ids[0]), sum(len(w.token_ids) for w in wholes))))

    async def _wholes(self, jobs: list[Job]) -> list[Event]:
        """Every job's events, each merged into one."""
        events: list[list[Event]] = [[] for _ in jobs]
        async with contextlib.aclosing(self._choices(jobs)) as choices:
            async for index, event in choices:
                events[index].append(event)
        return [stream.merged(e) for e in events]

    async def _chat_sse(self, cid: str, created: int, jobs: list[Job], include_usage: bool, continuous: bool):
        model, generated = self.model_name, [0] * len(jobs)

        def chunk(index: int, *fields) -> str:
            body = chat.chunk_body(cid, model, created, index, *fields)
            if continuous:
                body["usage"] = usage(len(jobs[index].prompt_ids), generated[index])
            return f"data: {json.dumps(body)}\n\n"

        for index in range(len(jobs)):
            yield chunk(index, {"role": "assistant", "content": ""}, None, [])
        try:
            async with contextlib.aclosing(self._choices(jobs)) as choices:
                async for index, event in choices:
                    generated[index] += len(event.token_ids)
                    yield chunk(index, {"content": event.text} if event.text else {}, event.finish_reason,
                                event.token_ids, chat.chat_logprobs(self.tokenizer, event.logprobs))
        except ServingError as error:
            yield f"data: {json.dumps(error_body(str(error), error.http_status, error.code))}\n\n"
        if include_usage:
            total = chat.usage_chunk(cid, model, created, len(jobs[0].prompt_ids), sum(generated))
            yield f"data: {json.dumps(total)}\n\n"
        yield "data: [DONE]\n\n"

    async def _sse(self, cid: str, model: str, jobs: list[Job], echoes: list[str | None], prompt_tokens: int,
                   include_usage: bool, continuous: bool):
        generated, offsets, started = [0] * len(jobs), [0] * len(jobs), set()
        with_logprobs = jobs[0].params.logprobs is not None
        try:
            async with contextlib.aclosing(self._choices(jobs)) as choices:
                async for index, event in choices:
                    generated[index] += len(event.token_ids)
                    text, logprobs = echoed(event, None if index in started else echoes[index], with_logprobs)
                    started.add(index)
                    logprobs = completion_logprobs(self.tokenizer, logprobs, offsets[index])
                    offsets[index] += len(text)
                    choice = completion_choice(index, text, event.token_ids, event.finish_reason, logprobs)
                    so_far = usage(len(jobs[index].prompt_ids), generated[index]) if continuous else None
                    yield f"data: {json.dumps(completion_body(cid, model, [choice], so_far))}\n\n"
        except ServingError as error:
            yield f"data: {json.dumps(error_body(str(error), error.http_status, error.code))}\n\n"
        if include_usage:
            yield f"data: {json.dumps(completion_body(cid, model, [], usage(prompt_tokens, sum(generated))))}\n\n"
        yield "data: [DONE]\n\n"


def build(args: dict) -> serve.Application:
    """Application builder for `serve run cluster.serving.app:build` and KubeRay's serveConfigV2 (`args`: the
    fields of ServeConfig; a serve config may also give the live ones as the deployment's user_config)."""
    return application(ServeConfig.model_validate(args or {}))


def application(config: ServeConfig, **options) -> serve.Application:
    """The Serve application of `config`: the version's fields bound as the replicas' init argument, the live ones
    as their user_config, the serving replicas' count or autoscaling as Serve's own options, and the version's
    expert controller as a deployment-scoped actor. `options`: more of Serve's deployment options."""
    version = version_args(config)
    scaling = ({"autoscaling_config": autoscaling_options(config.autoscaling)} if config.autoscaling
               else {"num_replicas": config.num_replicas})
    actor = {**REPLICA_ACTOR, "num_gpus": config.serving_gpus, **options.pop("ray_actor_options", {})}
    if config.engine == "vllm":
        from cluster.serving.vllm_server import VllmServer as server
    else:
        server = MoEServer
    return server.options(
        user_config=live_fields(config), max_surge_percent=rollout_surge(config), ray_actor_options=actor,
        deployment_actors=[controller_actor(version)], **scaling, **options,
    ).bind(version)
