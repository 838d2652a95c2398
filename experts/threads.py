"""Torch's thread budget in threads that Python starts.

OpenMP keeps its thread count per OS thread, and a thread that Python starts takes OMP_NUM_THREADS (Ray sets 1 in
every actor), whatever `torch.set_num_threads` said in the main thread: a worker's server threads and the serving
replica's engine thread computed on one core.
"""

import threading

import torch

_local = threading.local()


def use_process_threads() -> None:
    """Give this thread's torch ops the process's budget (`torch.set_num_threads`); cheap after the first call."""
    if not getattr(_local, "set", False):
        torch.set_num_threads(torch.get_num_threads())
        _local.set = True
