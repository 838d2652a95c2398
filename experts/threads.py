"""Torch's thread budget in threads that Python starts.

OpenMP keeps its thread count per OS thread, and a thread that Python starts takes OMP_NUM_THREADS (Ray sets 1 in
every actor), whatever `torch.set_num_threads` said in the main thread: a worker's server threads and the serving
replica's engine thread computed on one core. Each such thread calls `use_process_threads` when it starts.
"""

import torch


def use_process_threads() -> None:
    """Give this thread's torch ops the process's budget (`torch.set_num_threads`)."""
    torch.set_num_threads(torch.get_num_threads())
