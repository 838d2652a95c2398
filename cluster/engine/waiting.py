"""Sequences waiting for a batch slot, first come first served. A request's sequences (its prompts and choices)
join together, so that an engine admits them into one prefill rather than the first alone."""

import collections
import threading

from cluster.engine.sequence import Sequence
from cluster.errors import Overloaded


class Waiting:
    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._sequences: collections.deque[Sequence] = collections.deque()
        self._ready = threading.Condition()

    def put_all(self, sequences: list[Sequence]) -> None:
        with self._ready:
            if len(self._sequences) + len(sequences) > self.max_waiting:
                raise Overloaded(f"{len(self._sequences)} sequences already wait for a batch slot and this request "
                                 f"brings {len(sequences)}; at most {self.max_waiting} may wait (max_waiting): "
                                 "retry later")
            self._sequences.extend(sequences)
            self._ready.notify()

    def get(self, wait_s: float) -> Sequence | None:
        """The first waiting sequence; when none waits, the first to come within `wait_s`."""
        with self._ready:
            if not self._sequences and wait_s:
                self._ready.wait(wait_s)
            return self._sequences.popleft() if self._sequences else None

    def take(self, most: int) -> list[Sequence]:
        """Up to `most` waiting sequences, without waiting."""
        with self._ready:
            return [self._sequences.popleft() for _ in range(min(most, len(self._sequences)))]

    def __len__(self) -> int:
        return len(self._sequences)
