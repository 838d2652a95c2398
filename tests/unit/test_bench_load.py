"""The bench's load generator yields the cores to the processes it measures."""

import os
import sys
import threading

import pytest

from cluster.bench import at_niceness

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="a niceness per thread is Linux's")


def _niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)


def test_the_load_and_every_thread_it_starts_run_at_the_niceness_given():
    mine = _niceness()
    target = min(mine + 5, 19)

    def load():
        seen = []
        thread = threading.Thread(target=lambda: seen.append(_niceness()))
        thread.start()
        thread.join()
        return _niceness(), seen[0]

    assert at_niceness(target, load) == (target, target)
    assert _niceness() == mine  # the caller keeps its own


def test_a_failing_load_raises_in_the_caller():
    def load():
        raise ValueError("no server")

    with pytest.raises(ValueError, match="no server"):
        at_niceness(min(_niceness() + 1, 19), load)
