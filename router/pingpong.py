"""Micro-batches of one engine step interleaved in one thread, in the manner of SGLang's two-batch overlap and
MegaScale-Infer's ping-pong pipeline: each micro-batch runs its forward in a greenlet that pauses right after a MoE
layer's expert calls are sent; the next one computes meanwhile, and each resumes in turn to collect its replies.

The schedule is this module's alone: `interleave` runs tasks round-robin until each is done, and `pause` is the one
point where a task gives the thread away. Outside `interleave`, `pause` does nothing, so the model code is the
same either way.
"""

import functools
from collections import deque
from collections.abc import Callable
from typing import TypeVar

import greenlet

T = TypeVar("T")


class _MicroBatch(greenlet.greenlet):
    pass


def pause() -> None:
    """Let the step's other micro-batches run until this one's turn comes again."""
    current = greenlet.getcurrent()
    if isinstance(current, _MicroBatch):
        current.parent.switch()


def interleave(tasks: list[Callable[[], T]]) -> list[T]:
    """Each task's result, the tasks run round-robin from pause to pause; the first error once all are done (a
    task left paused would leave its expert calls unread)."""
    if len(tasks) == 1:
        return [tasks[0]()]
    results: list = [None] * len(tasks)
    errors: list[BaseException] = []

    def run(i: int, task: Callable[[], T]) -> None:
        try:
            results[i] = task()
        except BaseException as error:  # noqa: BLE001 (raised below, once the other tasks are done)
            errors.append(error)

    turns = deque(_MicroBatch(functools.partial(run, i, task)) for i, task in enumerate(tasks))
    while turns:
        batch = turns.popleft()
        batch.switch()
        if not batch.dead:
            turns.append(batch)
    if errors:
        raise errors[0]
    return results
