"""Outlier detection for expert workers, per router, the way Envoy does it: eject a worker whose call failed, back
off, probe it, readmit it once it answers. A worker is never left out while it answers its probes.

Pure Python with an injectable clock; the probing itself (a one-row Forward) is the router's.
"""

import threading
import time
from collections import Counter
from dataclasses import dataclass

COUNTERS = ("ejections", "probes", "probe_failures", "readmissions")


@dataclass
class _Ejected:
    probe_at: float  # no probe before this
    streak: int  # ejections and failed probes since the worker last served well for `healthy_s`
    reason: str


class WorkerHealth:
    def __init__(self, base_s: float = 0.25, max_s: float = 1.0, healthy_s: float = 10.0, clock=time.monotonic):
        """The n-th consecutive failure waits base_s * 2**(n-1), at most max_s, before the next probe; a readmitted
        worker that fails again within healthy_s continues its streak instead of starting over."""
        self.base_s, self.max_s, self.healthy_s, self.clock = base_s, max_s, healthy_s, clock
        self.counters: Counter[str] = Counter()
        self._ejected: dict[int, _Ejected] = {}
        self._readmitted: dict[int, tuple[float, int]] = {}  # worker -> (when, streak it had)
        self._lock = threading.Lock()
        self.changed = threading.Event()  # set on every ejection, so a prober can sleep until there is work

    def eject(self, worker: int, reason: str) -> None:
        with self._lock:
            if worker in self._ejected:  # another call saw the same failure
                return
            when, streak = self._readmitted.pop(worker, (-float("inf"), 0))
            streak = streak + 1 if self.clock() - when < self.healthy_s else 1
            self._ejected[worker] = _Ejected(self._after(streak), streak, reason)
            self.counters["ejections"] += 1
        self.changed.set()

    def ejected(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._ejected)

    def reason(self, worker: int) -> str:
        with self._lock:
            ejected = self._ejected.get(worker)
            return ejected.reason if ejected else ""

    def due(self) -> list[int]:
        """Ejected workers whose back-off is over: probe them now."""
        now = self.clock()
        with self._lock:
            return [w for w, e in self._ejected.items() if e.probe_at <= now]

    def next_due_s(self) -> float | None:
        """Seconds until the next probe is due; None when no worker is ejected."""
        with self._lock:
            if not self._ejected:
                return None
            return max(0.0, min(e.probe_at for e in self._ejected.values()) - self.clock())

    def probed(self, worker: int, error: str | None) -> None:
        """The outcome of a probe: `error` None readmits the worker, else its back-off grows."""
        with self._lock:
            ejected = self._ejected.get(worker)
            if ejected is None:
                return
            self.counters["probes"] += 1
            if error is None:
                del self._ejected[worker]
                self._readmitted[worker] = (self.clock(), ejected.streak)
                self.counters["readmissions"] += 1
            else:
                ejected.streak += 1
                ejected.probe_at, ejected.reason = self._after(ejected.streak), error
                self.counters["probe_failures"] += 1

    def drain_counters(self) -> dict[str, int]:
        """What the model did since the last drain, as {counter: n}."""
        with self._lock:
            out, self.counters = dict(self.counters), Counter()
        return out

    def forget(self, workers) -> None:
        """Workers replaced or gone from the routing table start afresh."""
        with self._lock:
            for worker in workers:
                self._ejected.pop(worker, None)
                self._readmitted.pop(worker, None)

    def _after(self, streak: int) -> float:
        return self.clock() + min(self.base_s * 2 ** (streak - 1), self.max_s)
