"""One engine step as a timeline: when each micro-batch ran (router/pingpong.py switches between them) and what its
MoE layer calls did. The router records into it; `moecluster bench` records one step (cluster/tools/step_timeline.py).

A micro-batch's time goes to: dense (attention, norms, gates: all but its expert calls), dispatch (planning and
sending a layer's calls), shared (the layer's shared expert, computed while its calls are in flight), wait (blocked
on the workers' replies), combine; or it is paused while another micro-batch runs, its own calls in flight.
"""

import contextlib
import time
from dataclasses import dataclass, field

import greenlet

CALL_PHASES = ("dispatch", "shared", "wait", "combine")  # the spans the router records
PHASES = ("dense", *CALL_PHASES, "paused")
MARKS = {"dense": "a", "dispatch": "s", "shared": "h", "wait": "w", "combine": "c", "paused": "."}


@dataclass
class StepRecord:
    """Per micro-batch (in the order they first ran): the stretches it ran and its calls' phases, in ms from the
    step's start."""

    step_ms: float = 0.0
    runs: list[list[tuple[float, float]]] = field(default_factory=list)  # (start, end) of each stretch it ran
    spans: list[list[tuple[str, int, float, float]]] = field(default_factory=list)  # (phase, layer, start, end)

    def totals(self) -> dict[int, dict[str, float]]:
        """Per micro-batch, ms in each of PHASES."""
        out = []
        for runs, spans in zip(self.runs, self.spans):
            ran = sum(end - start for start, end in runs)
            phase_ms = {phase: sum(e - s for p, _, s, e in spans if p == phase) for phase in CALL_PHASES}
            life = runs[-1][1] - runs[0][0] if runs else 0.0
            out.append({"dense": ran - sum(phase_ms.values()), **phase_ms, "paused": life - ran})
        return {i: {k: round(v, 3) for k, v in t.items()} for i, t in enumerate(out)}

    def chart(self, width: int = 100) -> list[str]:
        """One row per micro-batch, one mark per 1/width of the step (MARKS; blank before it starts or once done)."""
        rows = []
        for runs, spans in zip(self.runs, self.spans):
            row = []
            for cell in range(width):
                t = (cell + 0.5) * self.step_ms / width
                row.append(MARKS[_phase_at(t, runs, spans)] if runs and runs[0][0] <= t <= runs[-1][1] else " ")
            rows.append("".join(row))
        return rows

    def as_json(self) -> dict:
        return {"step_ms": round(self.step_ms, 3), "per_micro_batch_ms": self.totals(), "chart": self.chart(),
                "legend": {mark: phase for phase, mark in MARKS.items()},
                "spans": [[i, *span] for i, spans in enumerate(self.spans) for span in spans]}


def _phase_at(t: float, runs, spans) -> str:
    if not any(start <= t < end for start, end in runs):
        return "paused"
    return next((phase for phase, _, start, end in spans if start <= t < end), "dense")


class StepTimeline:
    def __init__(self):
        self._recording: _Recording | None = None

    def record(self, phase: str, layer: int, start: float, end: float) -> None:
        """A span of the running micro-batch's MoE layer call, in time.perf_counter seconds; kept only while a
        step is recorded."""
        recording = self._recording
        if recording is not None:
            recording.spans.append((greenlet.getcurrent(), phase, layer, start, end))

    @contextlib.contextmanager
    def recording(self):
        """Record the step run in this block (on this thread); the StepRecord it yields is filled in on exit."""
        record, recording = StepRecord(), _Recording(time.perf_counter(), greenlet.getcurrent())
        previous = greenlet.settrace(recording.trace)
        self._recording = recording
        try:
            yield record
        finally:
            self._recording = None
            greenlet.settrace(previous)
            recording.fill(record, time.perf_counter())


@dataclass
class _Recording:
    origin: float
    root: greenlet.greenlet  # the thread's own greenlet: the step's only micro-batch, or the scheduler of several
    spans: list = field(default_factory=list)
    switches: list = field(default_factory=list)  # (when, the greenlet switched to)

    def trace(self, event: str, args) -> None:
        if event in ("switch", "throw"):
            self.switches.append((time.perf_counter(), args[1]))

    def fill(self, record: StepRecord, ended: float) -> None:
        ms = lambda t: 1e3 * (t - self.origin)  # noqa: E731
        runs: dict = {}
        running, since = self.root, self.origin
        for when, target in [*self.switches, (ended, None)]:
            runs.setdefault(running, []).append((ms(since), ms(when)))
            running, since = target, when
        batches = [g for g in runs if g is not self.root] or [self.root]
        record.step_ms = ms(ended)
        record.runs = [[(s, e) for s, e in runs[g] if e > s] for g in batches]
        record.spans = [[(phase, layer, ms(s), ms(e)) for owner, phase, layer, s, e in self.spans if owner is g]
                        for g in batches]
