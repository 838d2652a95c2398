"""Options shared by both ends of Expert.Forward: the largest message a call may carry (a layer call's rows can
exceed gRPC's 4 MiB default), keepalive, and the credential every call to a worker sends."""

from protos.wire.unix_stream import FrameLimits

KEY_METADATA = "x-moecluster-cluster-key"  # the application's data-path key, on every call to a worker
_GRPC_MAX = 2**31 - 1  # gRPC's message lengths are 32-bit


def message_size(limits: FrameLimits) -> list[tuple[str, int]]:
    most = min(limits.message_bytes + limits.tensor_bytes, _GRPC_MAX)
    return [("grpc.max_send_message_length", most), ("grpc.max_receive_message_length", most)]


# A router pings each worker's connection every second, with calls in flight or not, and drops it when a ping
# goes unanswered for a second: a host cut off sends no reset, and a dead connection would hold new calls (and the
# probes that readmit the worker) until TCP gave up. It reconnects within a second of the host answering again.
ROUTER_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# A worker accepts those pings (by default gRPC answers pings this frequent with GOAWAY).
WORKER_KEEPALIVE = [
    ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0),
]
