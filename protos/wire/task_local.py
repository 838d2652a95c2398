"""State of the task in progress: a thread's, or a greenlet's where the micro-batches of one step interleave in
one thread (router/pingpong.py). A thread's greenlets share its `threading.local`; each has its own context
variables."""

from contextvars import ContextVar


class TaskLocal:
    def __init__(self, name: str):
        self._var: ContextVar[dict] = ContextVar(name)

    def vars(self) -> dict:
        """This task's own dict, empty at its first use."""
        try:
            return self._var.get()
        except LookupError:
            fresh: dict = {}
            self._var.set(fresh)
            return fresh
