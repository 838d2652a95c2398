"""Where an MoE layer call spends its time: gating, dispatch, waiting on workers, their compute, combining."""

import threading
import time

# overlapped: the router computing while a call's experts were in flight: the layer's shared expert
# (router/shared.py), or the step's other micro-batches while this one paused (router/pingpong.py)
PHASES = ("gating", "dispatch", "wait", "expert_compute", "overlapped", "combine")


class LayerTimings:
    def __init__(self):
        self._lock = threading.Lock()
        self._sums = dict.fromkeys(PHASES, 0.0)
        self._calls = 0
        self._gate_started: dict[int, float] = {}

    def add(self, **seconds: float) -> None:
        with self._lock:
            for phase, s in seconds.items():
                self._sums[phase] += s
            self._calls += "dispatch" in seconds

    def gate_hooks(self, gate_module) -> None:
        gate_module.register_forward_pre_hook(lambda m, args: self._gate_started.__setitem__(id(m), time.perf_counter()))
        gate_module.register_forward_hook(
            lambda m, args, out: self.add(gating=time.perf_counter() - self._gate_started.pop(id(m), time.perf_counter()))
        )

    def drain(self) -> dict:
        """{"calls": n, phase: seconds summed} since the last drain."""
        with self._lock:
            out = {"calls": self._calls, **self._sums}
            self._sums, self._calls = dict.fromkeys(PHASES, 0.0), 0
        return out


def merge(total: dict, part: dict) -> dict:
    return {key: total.get(key, 0) + part.get(key, 0) for key in ("calls", *PHASES)}


def per_call_ms(total: dict) -> dict:
    calls = total.get("calls", 0)
    return {phase: 1e3 * total.get(phase, 0.0) / calls if calls else 0.0 for phase in PHASES}
