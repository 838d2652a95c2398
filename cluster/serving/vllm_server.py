"""The serving replica of `engine: vllm`: vLLM's AsyncLLM runs the dense model, its MoE layers call this version's
expert workers (cluster/vllm_engine), and vLLM's own OpenAI server answers HTTP, behind moecluster's API keys and
body limit. moecluster.v1.Inference is served from the same engine.

The router lives in vLLM's model worker process. This replica checks in with the expert controller for it: the
router sends its load and health over the replica's report socket (cluster/vllm_engine/tier.py), the replica
reports them and answers with any newer routing table and live settings.
"""

import asyncio
import contextlib
import json
import logging
import os
import types
import uuid

import ray
from ray import serve
from transformers import AutoTokenizer

from cluster.config import with_live
from cluster.control.controller import CONTROLLER, RouterReport
from cluster.engine.sequence import SamplingParams
from cluster.errors import ExpertUnavailable, ServingError
from cluster.serving import grpc_api, stream
from cluster.serving.auth import ApiKeys
from cluster.serving.body_limit import BodyLimit
from cluster.serving.known_fields import KnownFields, field_names
from cluster.serving.logs import one_line_refusals
from cluster.serving.openai_api import error_body
from cluster.serving.replica import PROBE_TIMEOUT_S, REPLICA_ACTOR, served_model_name
from cluster.serving.requests import check_prompt_count, choice_params, parse_prompt, parse_sampling
from cluster.vllm_engine.args import vllm_args
from cluster.vllm_engine.tier import TierSpec, table_data
from protos import inference_pb2

log = logging.getLogger(__name__)
OPEN_PATHS = ("/health", "/ping", "/version")  # probes and load balancers, as on moecluster's engine


@serve.deployment(max_ongoing_requests=1024, ray_actor_options=REPLICA_ACTOR)
@serve.ingress()
class VllmServer:
    async def __init__(self, version: dict):
        self._version = version
        self.config = with_live(version, {})
        one_line_refusals()
        self.controller = serve.get_deployment_actor(CONTROLLER)
        self.model_dir = (await self.controller.model_ref.remote()).local()
        self._router_id = serve.get_replica_context().replica_id.unique_id
        table = await self.controller.attach.remote(self._router_id)
        self._node_id = ray.get_runtime_context().get_node_id()
        self._live_for_router: dict | None = None  # live settings the router has yet to be given
        report_socket = f"\0moecluster-tier-{uuid.uuid4().hex}"
        self._reports = await asyncio.start_unix_server(self._check_ins, path=report_socket)
        limits = self.config.limits
        spec = TierSpec(await self.controller.data_path_key.remote(), self.config.expert_timeout_s,
                        min(self.config.expert_timeout_s, PROBE_TIMEOUT_S),
                        (limits.frame_message_bytes, limits.frame_tensor_bytes), table_data(table), report_socket)
        self.model_name = served_model_name(self.config, self.model_dir)
        self.args = vllm_args(self.config, self.model_dir, self.model_name, spec)
        self.engine = _start_engine(self.args, self.config.serving_threads)
        self.keys = ApiKeys.load(self.config.api_keys_file)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._context_len = self.engine.model_config.max_model_len
        self.connections = grpc_api.ConnectionStreams(self.config.limits.streams_per_connection)

    async def __serve_build_asgi_app__(self):
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app

        from cluster.vllm_engine import tools

        tools.register()  # before vLLM's chat server looks its tool parser up
        tasks = await self.engine.get_supported_tasks()
        app = build_app(self.args, supported_tasks=tasks, model_config=self.engine.model_config)
        await init_app_state(self.engine, app.state, self.args, tasks)
        app.state.server = types.SimpleNamespace()  # vLLM's error handler flags it; Serve runs no uvicorn of its own
        # vLLM's app is built whole: no middleware can be added to it
        return _KeyCheck(BodyLimit(KnownFields(app, _known_fields())), self)

    # --- gRPC: moecluster.v1.Inference, on the same engine ---

    async def Generate(self, request: inference_pb2.GenerateRequest, grpc_context=None):
        try:
            if grpc_context is not None:
                self.keys.check(dict(grpc_context.invocation_metadata()).get("authorization"))
            asked = grpc_api.generation(request)
            jobs = self._jobs(asked)
            with self.connections.held(grpc_context.peer() if grpc_context is not None else None):
                async with contextlib.aclosing(stream.interleave(
                        [self._choice(ids, params) for ids, params in jobs])) as events:
                    async for index, event in events:
                        yield grpc_api.response(index, event)
        except ServingError as error:
            grpc_api.set_status(grpc_context, error)
            raise

    def _jobs(self, asked: grpc_api.Generation) -> list[tuple[list[int], SamplingParams]]:
        """(prompt ids, sampling) of prompt i's choice j at i * n + j, checked as moecluster's engine checks them."""
        limits, vocab, context = self.config.limits, self.engine.model_config.get_vocab_size(), self._context_len
        check_prompt_count(len(asked.prompts), limits)
        params = parse_sampling(**asked.sampling, vocab_size=vocab, context_len=context,
                                default_max_tokens=self.config.default_max_tokens, limits=limits)
        prompts = [parse_prompt(p, name=f"prompt[{i}]" if len(asked.prompts) > 1 else "prompt",
                                tokenizer=self.tokenizer, vocab_size=vocab, context_len=context, limits=limits,
                                add_special_tokens=asked.add_special_tokens) for i, p in enumerate(asked.prompts)]
        return [(ids, choice) for ids in prompts for choice in choice_params(params, asked.n, limits.max_n)]

    async def _choice(self, prompt_ids: list[int], params: SamplingParams):
        from vllm.inputs import TokensPrompt

        from cluster.vllm_engine.engine import ExpertsLost
        from cluster.vllm_engine.requests import event, vllm_sampling

        outputs = self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), vllm_sampling(params),
                                       f"grpc-{uuid.uuid4().hex}")
        try:
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    yield event(output, params.logprobs)
        except ExpertsLost as error:
            raise ExpertUnavailable(str(error)) from None

    async def reconfigure(self, live: dict) -> None:
        """Serve's in-place update of the live fields (`cluster.config.LIVE_FIELDS`)."""
        config = with_live(self._version, live)
        self.keys = ApiKeys.load(config.api_keys_file)
        if self.keys.open:
            log.warning("no API key is set (MOECLUSTER_API_KEY or api_keys_file): anyone who reaches the APIs can "
                        "use them")
        BodyLimit.max_bytes = config.limits.max_body_bytes
        self.connections.limit = config.limits.streams_per_connection
        self._live_for_router = config.model_dump(mode="json")
        self.config = config
        await self.controller.set_live.remote(live)

    async def _check_ins(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The router's check-ins, one line of JSON each (tier.report), each answered with one line
        (tier.apply_reply); and the requests that needed a lost expert (lost.LostRequests), each answered once the
        engine fails them."""
        reachable = True
        async with contextlib.aclosing(_lines(reader)) as lines:
            async for router in lines:
                if "lost" in router:  # not a check-in: the processor's message
                    self.engine.lose(router["lost"], router["why"])
                    writer.write(b"{}\n")
                    await writer.drain()
                    continue
                report = RouterReport(
                    self._router_id, self._node_id, router["pid"], router["version"], router["experts"],
                    {int(w): rows for w, rows in router["workers"].items()}, router["timings"], router["counters"],
                    router["ejected"])
                try:
                    table = await asyncio.wait_for(self.controller.report.remote(report), timeout=10)
                except (ray.exceptions.RayError, TimeoutError) as error:
                    if reachable:
                        log.warning("expert controller unreachable, serving with routing table v%d: %s",
                                    router["version"], type(error).__name__)
                    reachable, table = False, None
                    self._find_controller()
                else:
                    if not reachable:
                        log.warning("expert controller reachable again")
                    reachable = True
                live, self._live_for_router = self._live_for_router, None
                writer.write(json.dumps({"table": table_data(table) if table else None, "config": live}).encode()
                             + b"\n")
                await writer.drain()

    def _find_controller(self) -> None:
        try:
            self.controller = serve.get_deployment_actor(CONTROLLER)
        except ValueError:
            pass  # not registered again yet

    def __del__(self):
        if hasattr(self, "engine"):
            self.engine.shutdown()
        try:
            ray.get(self.controller.release.remote(self._router_id), timeout=30)
        except Exception:
            log.exception("could not release the expert workers")


async def _lines(reader: asyncio.StreamReader):
    while line := await reader.readline():
        yield json.loads(line)


def _known_fields() -> dict[str, frozenset[str]]:
    """The routes whose unknown fields are refused by name, and the fields vLLM's request models know there."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.serve.tokenize.protocol import (
        DetokenizeRequest,
        TokenizeChatRequest,
        TokenizeCompletionRequest,
    )

    return {"/v1/completions": field_names([CompletionRequest]),
            "/v1/chat/completions": field_names([ChatCompletionRequest]),
            "/tokenize": field_names([TokenizeCompletionRequest, TokenizeChatRequest]),
            "/detokenize": field_names([DetokenizeRequest])}


def _start_engine(args, threads: int | None):
    from vllm.engine.arg_utils import AsyncEngineArgs

    from cluster.vllm_engine.engine import TierEngine

    cores = sorted(os.sched_getaffinity(0))[: threads or None]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return TierEngine.from_engine_args(AsyncEngineArgs.from_cli_args(args))


class _KeyCheck:
    """ASGI middleware: the replica's API keys on every HTTP and WebSocket route but the probes'."""

    def __init__(self, app, replica: VllmServer):
        self.app, self.replica = app, replica

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))  # Serve's route prefix is the root
        if scope["type"] not in ("http", "websocket") or path in OPEN_PATHS or (
                path == "/metrics" and self.replica.config.metrics_open):
            return await self.app(scope, receive, send)
        try:
            self.replica.keys.check(dict(scope["headers"]).get(b"authorization", b"").decode() or None)
        except ServingError as error:
            log.info("rejected request: %s", error)
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008, "reason": str(error)})
            body = json.dumps(error_body(str(error), error.http_status, error.code)).encode()
            await send({"type": "http.response.start", "status": error.http_status,
                        "headers": [(b"content-type", b"application/json")]})
            return await send({"type": "http.response.body", "body": body})
        await self.app(scope, receive, send)
