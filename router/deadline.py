"""How long a layer call may wait on a worker before the worker is taken for silent. Pure Python.

A host that is cut off, or a process that is stopped, sends no reset: only time tells it from a slow answer. Where
every expert of a layer has another replica, a share is given a multiple of the layer's recent p99 (with a floor),
not the whole expert deadline: a worker that misses it is ejected, its share goes to the other replicas, and the
probes readmit it once it answers. Where an expert has a single replica there is nowhere else to go, and a call
waits the whole expert deadline.
"""

import heapq
import threading
from collections import deque


class CallDeadlines:
    def __init__(self, cap_s: float, factor: float = 8.0, floor_s: float = 1.0, window: int = 256, warmup: int = 16):
        """`cap_s`: the expert deadline, which no call exceeds (and every call gets until `warmup` calls of its
        layer are known); otherwise `factor` times the p99 of the layer's last `window` calls, at least
        `floor_s`."""
        self.cap_s, self.factor, self.floor_s, self.warmup = cap_s, factor, floor_s, warmup
        self._window = window
        self._recent: dict[int, deque] = {}
        self._lock = threading.Lock()

    def observe(self, layer: int, seconds: float) -> None:
        """A layer call that every worker answered, and how long it took."""
        with self._lock:
            self._recent.setdefault(layer, deque(maxlen=self._window)).append(seconds)

    def timeout_s(self, layer: int, replicated: bool) -> float:
        """The deadline of a call of `layer`; `replicated`: every expert of the layer has another replica."""
        if not replicated:
            return self.cap_s
        with self._lock:
            recent = list(self._recent.get(layer, ()))
        if len(recent) < self.warmup:
            return self.cap_s
        above = len(recent) - min(len(recent) - 1, int(0.99 * len(recent)))  # the p99 and the calls above it
        p99 = heapq.nlargest(above, recent)[-1]  # a layer call's hot path: no whole sort
        return min(self.cap_s, max(self.floor_s, self.factor * p99))
