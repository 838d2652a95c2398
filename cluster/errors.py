"""Every error a client can see, and the one place that maps each to its gRPC and HTTP status."""

import grpc


class ServingError(Exception):
    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500
    code: str | None = None  # OpenAI's error code, where it has one


class InvalidRequest(ServingError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class Unauthenticated(ServingError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    code = "invalid_api_key"


class ModelNotFound(ServingError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    code = "model_not_found"


class UnknownService(ServingError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class Overloaded(ServingError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class ExpertUnavailable(ServingError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


def as_serving_error(error: Exception) -> ServingError:
    """Errors from below the serving edge, translated; a lost or failing expert worker is UNAVAILABLE."""
    from router.client import ExpertCallError
    from router.replicas import NoReplica

    if isinstance(error, ServingError):
        return error
    if isinstance(error, (ExpertCallError, NoReplica)):
        return ExpertUnavailable(str(error))
    return ServingError(f"internal error: {type(error).__name__}: {error}")
