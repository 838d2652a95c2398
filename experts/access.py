"""Who may call an expert worker over gRPC: members of its application, which send the application's data-path key
on every call (Forward, health and reflection alike). The key is made once per application and kept in Ray's
internal KV, which only processes of the Ray cluster can read (Ray's own token authentication guards it)."""

import hmac

import grpc

from protos.wire.grpc_options import KEY_METADATA


class RequireKey(grpc.ServerInterceptor):
    def __init__(self, key: str):
        self._key = key.encode()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        sent = dict(details.invocation_metadata or ()).get(KEY_METADATA, "")
        if handler is None or hmac.compare_digest(sent.encode(), self._key):
            return handler
        return _refusal(handler)


def _refuse(request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, f"this expert worker answers members of its application only: "
                                                   f"send its data-path key as {KEY_METADATA}")


_REFUSALS = {  # a refusal of the same shape as the method, so that gRPC reads the call as it was sent
    (False, False): grpc.unary_unary_rpc_method_handler(_refuse),
    (False, True): grpc.unary_stream_rpc_method_handler(_refuse),
    (True, False): grpc.stream_unary_rpc_method_handler(_refuse),
    (True, True): grpc.stream_stream_rpc_method_handler(_refuse),
}


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    return _REFUSALS[(handler.request_streaming, handler.response_streaming)]
