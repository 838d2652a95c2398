import pytest
import torch

from protos import expert_pb2
from protos.wire.tensor import from_proto, header, raw_bytes, to_proto


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_keeps_bytes_dtype_and_shape(dtype):
    tensor = torch.randn(4, 7).to(dtype)
    message = to_proto(tensor)
    assert message.dtype == str(dtype).removeprefix("torch.") and list(message.shape) == [4, 7]
    assert torch.equal(from_proto(expert_pb2.Tensor.FromString(message.SerializeToString())), tensor)


def test_rejects_wrong_byte_count_and_unknown_dtype():
    with pytest.raises(ValueError, match="needs 16 bytes"):
        from_proto(expert_pb2.Tensor(data=b"\0" * 15, dtype="float32", shape=[2, 2]))
    with pytest.raises(ValueError, match="unsupported tensor dtype"):
        from_proto(expert_pb2.Tensor(data=b"", dtype="object", shape=[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_header_and_raw_bytes_round_trip_without_copies(dtype):
    tensor = torch.randn(6, 5).to(dtype)
    data = raw_bytes(tensor[2:])  # a contiguous slice is sent from the tensor's own memory
    assert data.obj.ctypes.data == tensor[2:].data_ptr()
    received = bytearray(data)
    out = from_proto(expert_pb2.Tensor.FromString(header(tensor[2:]).SerializeToString()), received)
    assert torch.equal(out, tensor[2:])
    out.zero_()  # the tensor is the received buffer itself, not a copy of it
    assert not any(received)


def test_a_frame_is_received_into_the_buffer_given():
    import socket

    from protos.wire import unix_stream

    tensor, given = torch.randn(3, 4).to(torch.bfloat16), bytearray(24)
    sent, received = socket.socketpair()
    with sent, received:
        unix_stream.send(sent, header(tensor).SerializeToString(), raw_bytes(tensor))
        code, message, data = unix_stream.receive(received, into=lambda n: memoryview(given)[:n])
    out = from_proto(expert_pb2.Tensor.FromString(bytes(message)), data)
    assert torch.equal(out, tensor) and bytes(given) == bytes(raw_bytes(tensor))
    out.zero_()  # the tensor is the given buffer itself
    assert not any(given)


def test_a_frame_larger_than_the_socket_buffer_goes_in_pieces_and_arrives_whole():
    import socket
    import threading

    from protos.wire import unix_stream

    tensor = torch.randn(512, 1024)  # 2 MiB: several sends where the buffer holds 64 KiB
    sent, received = socket.socketpair()
    sent.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    with sent, received:
        out = {}
        reader = threading.Thread(target=lambda: out.update(frame=unix_stream.receive(received)))
        reader.start()
        unix_stream.send(sent, header(tensor).SerializeToString(), raw_bytes(tensor))
        reader.join(10)
    code, message, data = out["frame"]
    assert torch.equal(from_proto(expert_pb2.Tensor.FromString(bytes(message)), data), tensor)
