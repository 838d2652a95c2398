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

    def put_first(self, sequence: Sequence) -> None:
        """`sequence` again, ahead of every other: it was admitted once already."""
        with self._ready:
            self._sequences.appendleft(sequence)
            self._ready.notify()

    def wait(self, wait_s: float) -> None:
        """Until a sequence waits, or `wait_s` has passed."""
        with self._ready:
            if not self._sequences and wait_s:
                self._ready.wait(wait_s)

    def take(self, most: int, room: int | None = None) -> list[Sequence]:
        """Up to `most` waiting sequences in order, without waiting, as long as their prompts fit in `room`
        KV-cache positions (None: no bound)."""
        taken = []
        with self._ready:
            while self._sequences and len(taken) < most:
                need = self._sequences[0].prefill_len
                if room is not None and need > room:
                    break
                room = None if room is None else room - need
                taken.append(self._sequences.popleft())
        return taken

    def __len__(self) -> int:
        return len(self._sequences)
