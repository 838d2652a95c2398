"""Host copies of a GPU's tensors for the wire, through pinned buffers that each task (thread, or micro-batch's
greenlet) reuses call after call.

A copy between a GPU and pinned memory is a DMA the host need not wait for; one from pageable memory first
goes through the driver's own staging, synchronously. Tensors already on the host pass through untouched.
"""

import torch

from protos.wire.task_local import TaskLocal


class HostStaging:
    def __init__(self):
        self._local = TaskLocal("staging")  # this task's {role: (pinned bytes, event after the last copy from them)}

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` in host memory; valid until this thread's next `to_host`."""
        if tensor.device.type != "cuda":
            return tensor
        host = self._take("to_host", tensor.shape, tensor.dtype)
        host.copy_(tensor, non_blocking=True)
        torch.cuda.current_stream(tensor.device).synchronize()  # the wire reads it next
        return host

    def host_like(self, tensor: torch.Tensor) -> torch.Tensor:
        """An uninitialised host tensor of `tensor`'s shape and dtype, to receive into and then `to_device`."""
        if tensor.device.type != "cuda":
            return torch.empty(tensor.shape, dtype=tensor.dtype)
        return self._take("received", tensor.shape, tensor.dtype)

    def received_bytes(self, nbytes: int) -> memoryview:
        """This thread's received buffer as `nbytes` writable bytes, to receive a tensor's raw bytes into."""
        return memoryview(self._take("received", (nbytes,), torch.uint8).numpy())

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`host` on `device`. A host tensor that is not this thread's received buffer is first copied into it."""
        if device.type != "cuda":
            return host.to(device)
        buffer, _ = self._slots().get("received", (None, None))
        if buffer is None or host.data_ptr() != buffer.data_ptr():
            host = self._take("received", host.shape, host.dtype).copy_(host)
        out = host.to(device, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(device))
        self._slots()["received"] = (self._slots()["received"][0], copied)
        return out

    def _slots(self) -> dict:
        return self._local.vars()

    def _take(self, role: str, shape, dtype: torch.dtype) -> torch.Tensor:
        buffer, copied = self._slots().get(role, (None, None))
        if copied is not None:
            copied.synchronize()  # a copy from it may still be in flight
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self._slots()[role] = (buffer, None)
        return buffer[:nbytes].view(dtype).view(shape)
