"""Hedged expert calls ("The Tail at Scale"): a worker's share that has not answered long after a layer's calls
usually take is also sent to other replicas of its experts, and the first complete answer wins. Hedges are
rationed, so a slow cluster does not double its own load. Pure Python.
"""

import statistics
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Hedge:
    """What the client needs for one layer call: when to hedge, where to, and whether the budget allows it."""

    after_s: float
    reroute: Callable[[list[int], set[int]], dict[int, int] | None]  # (experts, workers to avoid) -> expert -> worker
    take: Callable[[], bool]


class HedgePolicy:
    def __init__(self, factor: float = 4.0, min_s: float = 0.02, budget: float = 0.05, burst: float = 4.0,
                 window: int = 64, warmup: int = 8):
        """Hedge a share after `factor` times the median of the layer's last `window` calls (at least `min_s`),
        once `warmup` calls are known; at most `budget` hedges per call on average, `burst` at once."""
        self.factor, self.min_s, self.budget, self.burst, self.warmup = factor, min_s, budget, burst, warmup
        self._recent: dict[int, deque] = {}
        self._window = window
        self._tokens = burst
        self._lock = threading.Lock()

    def observe(self, layer: int, seconds: float) -> None:
        with self._lock:
            self._recent.setdefault(layer, deque(maxlen=self._window)).append(seconds)
            self._tokens = min(self.burst, self._tokens + self.budget)

    def after_s(self, layer: int) -> float | None:
        """How long a share of `layer` may take before it is hedged; None until enough calls are known."""
        with self._lock:
            recent = self._recent.get(layer)
            if recent is None or len(recent) < self.warmup:
                return None
            return max(self.min_s, self.factor * statistics.median(recent))

    def take(self) -> bool:
        """Spend one hedge from the budget, if there is one."""
        with self._lock:
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True
