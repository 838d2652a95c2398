"""Faults done to real processes, and changes made to a running deployment: what each cost, printed at the end of
the session."""

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

MATRIX: list["Row"] = []
CHANGES: list[str] = []  # one line per change of test_rollouts


@dataclass
class Row:
    fault: str
    replicas: int
    requests: int
    failed: int
    wrong: int
    recovery_s: float | None  # from the fault's end to full capacity
    note: str = ""

    def line(self) -> str:
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.1f}s"
        return f"| {self.fault} | {self.replicas} | {self.failed}/{self.requests} | {self.wrong} | {recovery} | {self.note} |"


def pids_titled(prefix: str) -> list[int]:
    """Processes whose title (Ray's `ray::Name`) starts with `prefix`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and title.startswith(prefix):
            pids.append(int(proc.name))
    return pids


def stall(pid: int, seconds: float) -> None:
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


def duty_cycle(pid: int, stopped_s: float, running_s: float, cycles: int) -> None:
    """A slow worker: stopped and resumed in turn."""
    for _ in range(cycles):
        stall(pid, stopped_s)
        time.sleep(running_s)


def summary() -> list[str]:
    if not MATRIX:
        return []
    return ["| fault | replicas per expert | requests failed | wrong tokens | time to full capacity | |",
            "|---|---|---|---|---|---|", *(row.line() for row in MATRIX)]
