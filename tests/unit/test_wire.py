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
