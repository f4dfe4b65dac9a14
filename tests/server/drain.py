"""What the SIGTERM-drain tests share: signal a server while it holds work, and read its exit
status from the launcher's log (the launcher is its parent, so psutil cannot reap it)."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil


def sigterm_when_busy(
    victim: psutil.Process, running: Callable[[], int], exit_bound: float, tries: int
) -> tuple[float, int]:
    """SIGTERM ``victim`` once ``running()`` reports work (or after ``tries`` polls 50 ms
    apart), so the drain has something to finish; wait up to ``exit_bound`` seconds for its
    exit. Returns the seconds it took and the requests it ran when signalled."""
    busy = 0
    for _ in range(tries):
        busy = running()
        if busy:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    victim.wait(exit_bound)
    return time.monotonic() - t0, busy


def launcher_exit_code(launch_log: Path, port: int) -> int:
    """The exit status of the server on ``port``, as the launcher logged it."""
    exited = re.compile(rf"\(port {port}[,)].* exited with status (-?\d+)")
    deadline = time.monotonic() + 5  # the launcher polls its children every 0.5 s
    while not (found := exited.search(launch_log.read_text())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert found, f"the launcher never saw port {port}'s server exit"
    return int(found[1])
