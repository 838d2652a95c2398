"""The gRPC ingress as tooling expects it: moecluster.v1.Inference, the standard health service, reflection v1
and v1alpha; a request that is not a valid message is INVALID_ARGUMENT, not an exception in the proxy.

Serve's gRPC proxies register the servicer functions named in SERVICERS; the proxy routes each method of a
registered service to the application's method of the same name, except reflection, which the proxy answers.
"""

import contextlib
import threading
from collections import Counter
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection, reflection_pb2

from cluster.errors import InvalidRequest, Overloaded
from cluster.serving.logs import one_line_refusals
from protos import inference_pb2

SERVICERS = [
    "cluster.serving.grpc_api.add_inference_servicer",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
    "cluster.serving.grpc_api.add_reflection_v1",  # last: it advertises the services registered before it
]
SERVICE = "moecluster.v1.Inference"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


@dataclass(frozen=True)
class Undecodable:
    """Bytes that are no GenerateRequest (corrupt, or a string field that is not UTF-8), carried to the replica
    so that it answers INVALID_ARGUMENT."""

    error: str


def decode_request(data: bytes) -> inference_pb2.GenerateRequest | Undecodable:
    try:
        return inference_pb2.GenerateRequest.FromString(data)
    except DecodeError as error:
        return Undecodable(str(error))


def add_inference_servicer(servicer, server) -> None:
    one_line_refusals()  # this runs in the proxy, which logs every failed call too
    handlers = {"Generate": grpc.unary_stream_rpc_method_handler(
        servicer.Generate, request_deserializer=decode_request,
        response_serializer=inference_pb2.GenerateResponse.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def add_reflection_v1(servicer, server) -> None:
    """Reflection v1 beside the v1alpha that Serve enables: the two protocols' messages are the same fields, so
    v1alpha's servicer answers v1's method too. Answered by the proxy itself, as Serve does for v1alpha."""
    from ray.serve._private.grpc_util import get_service_names

    names = sorted(get_service_names(server.generic_rpc_handlers) - {"ray.serve.RayServeAPIService"})
    answer = reflection.ReflectionServicer([*names, REFLECTION_V1, reflection.SERVICE_NAME])
    handler = grpc.stream_stream_rpc_method_handler(
        answer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_passthrough_service(REFLECTION_V1)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        REFLECTION_V1, {"ServerReflectionInfo": handler}),))


@dataclass(frozen=True)
class Generation:
    """What a GenerateRequest asks for: its prompts (text or token ids), choices per prompt, and parse_sampling's
    fields."""

    prompts: list[str | list[int]]
    n: int
    add_special_tokens: bool
    sampling: dict


def generation(request: inference_pb2.GenerateRequest | Undecodable) -> Generation:
    if isinstance(request, Undecodable):
        raise InvalidRequest(f"the request is not a valid moecluster.v1.GenerateRequest: {request.error}")

    def optional(name: str):
        return getattr(request, name) if request.HasField(name) else None

    if request.prompts:
        prompts = [list(p.token_ids) if p.token_ids else p.text for p in request.prompts]
    else:
        prompts = [list(request.prompt_token_ids) if request.prompt_token_ids else request.prompt]
    sampling = dict(
        max_tokens=optional("max_tokens"), temperature=optional("temperature"), top_p=optional("top_p"),
        seed=optional("seed"), stop=list(request.stop), ignore_eos=request.ignore_eos, logprobs=optional("logprobs"),
        top_k=optional("top_k"), min_p=optional("min_p"), repetition_penalty=optional("repetition_penalty"),
        presence_penalty=optional("presence_penalty"), frequency_penalty=optional("frequency_penalty"),
        min_tokens=optional("min_tokens"), logit_bias=dict(request.logit_bias) or None)
    return Generation(prompts, 1 if optional("n") is None else request.n, request.add_special_tokens, sampling)


def set_status(grpc_context, error) -> None:
    """The status of `error` (a ServingError) on the call, for Serve's proxy to answer with once it is raised."""
    if grpc_context is not None:
        grpc_context.set_code(error.grpc_code)
        grpc_context.set_details(str(error))


def response(index: int, event) -> inference_pb2.GenerateResponse:
    logprobs = [inference_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                           top_token_ids=[t for t, _ in lp.top], top_logprobs=[v for _, v in lp.top])
                for lp in event.logprobs or []]
    return inference_pb2.GenerateResponse(token_ids=event.token_ids, text=event.text,
                                          finish_reason=event.finish_reason or "", logprobs=logprobs, index=index)


class ConnectionStreams:
    """Generate calls in flight per client connection (its peer address), capped: HTTP/2 lets one connection
    open many streams, and each is a sequence in the batch."""

    def __init__(self, limit: int):
        self.limit, self._open, self._lock = limit, Counter(), threading.Lock()

    @contextlib.contextmanager
    def held(self, peer: str | None):
        """One call of `peer`'s for the time of the block; None: a caller with no connection (in-process)."""
        if peer is None:
            yield
            return
        with self._lock:
            if self._open[peer] >= self.limit:
                raise Overloaded(f"this connection already has {self.limit} Generate calls in flight "
                                 "(limits.streams_per_connection); open another connection or wait")
            self._open[peer] += 1
        try:
            yield
        finally:
            with self._lock:
                self._open[peer] -= 1
                if not self._open[peer]:
                    del self._open[peer]
