"""One device per op, as CUDA demands, checked on a machine without a GPU.

Weights and activations on PyTorch's `meta` device stand in for a GPU's; `one_device` refuses any op whose tensors
span devices, where the meta device alone lets some through (matmuls, index_select) that CUDA refuses.
"""

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Copies between devices are the explicit moves; every other op must find its tensors on one device.
_MOVES = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default, torch.ops.aten._copy_from.default}


class DeviceMixed(RuntimeError):
    pass


class _OneDevice(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _MOVES:
            # A CPU scalar (0-dim) may meet a tensor on any device, on CUDA too.
            devices = {t.device for t in tree_leaves((args, kwargs))
                       if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)}
            if len(devices) > 1:
                raise DeviceMixed(f"{func} mixes tensors on {sorted(map(str, devices))}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def one_device():
    with _OneDevice():
        yield
