"""Options shared by both ends of Expert.Forward: the largest message a call may carry (a layer call's rows can
exceed gRPC's 4 MiB default), and the credential every call to a worker sends."""

from protos.wire.unix_stream import FrameLimits

KEY_METADATA = "x-moecluster-cluster-key"  # the application's data-path key, on every call to a worker
_GRPC_MAX = 2**31 - 1  # gRPC's message lengths are 32-bit


def message_size(limits: FrameLimits) -> list[tuple[str, int]]:
    most = min(limits.message_bytes + limits.tensor_bytes, _GRPC_MAX)
    return [("grpc.max_send_message_length", most), ("grpc.max_receive_message_length", most)]
