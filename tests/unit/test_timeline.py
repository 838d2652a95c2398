"""One step's timeline: when each micro-batch ran, and its calls' phases, from the switches between them."""

import time

from router.pingpong import interleave, pause
from router.timeline import StepTimeline


def layer_call(timeline: StepTimeline, layer: int, dense_s: float, wait_s: float, shared_s: float = 0.0) -> None:
    """A micro-batch's dense compute, then one MoE layer call: dispatch, its shared expert, paused, wait,
    combine."""
    time.sleep(dense_s)
    started = time.perf_counter()
    time.sleep(0.002)
    sent = time.perf_counter()
    timeline.record("dispatch", layer, started, sent)
    if shared_s:
        time.sleep(shared_s)
        timeline.record("shared", layer, sent, time.perf_counter())
    pause()
    resumed = time.perf_counter()
    time.sleep(wait_s)
    received = time.perf_counter()
    timeline.record("wait", layer, resumed, received)
    timeline.record("combine", layer, received, time.perf_counter())


def test_two_micro_batches_take_turns_and_each_is_paused_while_the_other_runs():
    timeline = StepTimeline()
    with timeline.recording() as record:
        interleave([lambda: layer_call(timeline, 0, 0.010, 0.001, 0.002), lambda: layer_call(timeline, 0, 0.010, 0.001)])
    assert len(record.runs) == 2 and all(len(runs) == 2 for runs in record.runs)  # before and after its pause
    first, second = record.runs
    assert first[0][1] <= second[0][0] + 1e-6 and second[0][1] <= first[1][0] + 1e-6  # one at a time, in turns
    totals = record.totals()
    assert totals[0]["paused"] >= 10.0  # while the second one computed its dense part
    assert totals[0]["dense"] >= 9.0 and totals[0]["dispatch"] >= 1.5
    assert totals[0]["shared"] >= 1.5 and totals[1]["shared"] == 0.0
    chart = record.chart(width=50)
    assert chart[0].startswith("a") and "." in chart[0] and chart[1].startswith(" ")
    assert set(record.as_json()["legend"].values()) == {"dense", "dispatch", "shared", "wait", "combine",
                                                             "paused"}


def test_a_single_micro_batch_runs_the_whole_step():
    timeline = StepTimeline()
    with timeline.recording() as record:
        interleave([lambda: layer_call(timeline, 3, 0.005, 0.004)])
    assert record.runs == [[(0.0, record.step_ms)]]
    assert [span[:2] for span in record.spans[0]] == [("dispatch", 3), ("wait", 3), ("combine", 3)]
    assert record.totals()[0]["paused"] == 0.0 and record.totals()[0]["wait"] >= 3.5


def test_nothing_is_kept_outside_a_recording():
    timeline = StepTimeline()
    timeline.record("wait", 0, 0.0, 1.0)
    with timeline.recording() as record:
        pass
    assert record.spans == [[]]
