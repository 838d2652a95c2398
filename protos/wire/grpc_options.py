"""Channel and server options shared by both ends of Expert.Forward: a layer call's rows can exceed gRPC's 4 MiB
default, and the worker's own checks bound what a call may carry."""

MESSAGE_SIZE = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
