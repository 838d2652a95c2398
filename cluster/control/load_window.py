"""Tokens per expert over a sliding window of time."""

import time
from collections import Counter, deque


class TokenWindow:
    def __init__(self, window_s: float, bucket_s: float = 1.0, clock=time.monotonic):
        self.window_s, self.bucket_s, self.clock = window_s, bucket_s, clock
        self._buckets: deque[tuple[float, Counter]] = deque()

    def add(self, counts: dict[str, int]) -> None:
        now = self.clock()
        if not self._buckets or now - self._buckets[-1][0] >= self.bucket_s:
            self._buckets.append((now, Counter()))
        self._buckets[-1][1].update(counts)
        self._expire(now)

    def totals(self) -> Counter:
        self._expire(self.clock())
        total = Counter()
        for _, counts in self._buckets:
            total.update(counts)
        return total

    def _expire(self, now: float) -> None:
        while self._buckets and now - self._buckets[0][0] > self.window_s:
            self._buckets.popleft()
