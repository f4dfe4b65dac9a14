"""The scheduler thread and its inbox.

One thread owns the scheduler (and the disaggregation side): it alone touches their state.
Other threads reach it only through the inbox, as functions it runs between steps:
``call_soon`` (fire and forget) or ``call`` (wait for the result). What holds: every command
queued before a step runs before that step (the inbox is drained first), so a request added
and then aborted never sees a forward in between; a failing command is reported to its
caller (or logged) and the thread keeps serving.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from plait.core.backend_api import Backend
from plait.core.scheduler import Scheduler

if TYPE_CHECKING:
    from plait.disaggregation.decode import DecodeSide
    from plait.disaggregation.prefill import PrefillSide

log = logging.getLogger(__name__)
Command = tuple[Callable[[], Any], Future | None]


class EngineLoop:
    """The inbox exists from construction, so the runtime being built can already queue to
    it (the prefill side does); the thread runs from :meth:`start` to :meth:`stop`."""

    def __init__(self) -> None:
        self._inbox: queue.Queue[Command] = queue.Queue()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(
        self, scheduler: Scheduler, disagg: PrefillSide | DecodeSide | None, backend: Backend
    ) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(scheduler, disagg, backend), name="plait-scheduler", daemon=True
        )
        self._thread.start()

    def call_soon(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the scheduler thread before its next step; errors are logged."""
        self._inbox.put((fn, None))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the scheduler thread between steps and wait for its result."""
        fut: Future = Future()
        self._inbox.put((fn, fut))
        return fut.result()

    def stop(self, timeout: float = 5.0) -> bool:
        """Ask the thread to stop and wait up to ``timeout`` for it (not when called on the
        thread itself). True once it has stopped; False while it is stuck mid-forward."""
        self._stopped.set()
        thread = self._thread
        if thread is None:
            return True
        if thread is not threading.current_thread():
            thread.join(timeout=timeout)
        return not thread.is_alive()

    def _run(
        self, scheduler: Scheduler, disagg: PrefillSide | DecodeSide | None, backend: Backend
    ) -> None:
        # With the overlap schedule the forwards (and sampling) run on the executor's thread;
        # this one only plans batches, so it runs as a host thread.
        overlap = scheduler.executor.overlap
        try:
            with backend.host_thread() if overlap else contextlib.nullcontext():
                self._serve(scheduler, disagg)
        finally:
            scheduler.close()

    def _serve(self, scheduler: Scheduler, disagg: PrefillSide | DecodeSide | None) -> None:
        while not self._stopped.is_set():
            try:
                busy = scheduler.has_work()
                # requests waiting for KV from elsewhere: poll often, but never spin
                waiting = disagg is not None and disagg.has_work()
                cmd = self._inbox.get(block=not busy, timeout=0.002 if waiting else 0.1)
                _run_command(cmd)
                continue  # drain every pending command before the next forward
            except queue.Empty:
                pass
            if disagg is not None:
                disagg.poll()
            if scheduler.has_work():
                scheduler.step()


def _run_command(cmd: Command) -> None:
    fn, fut = cmd
    try:
        result = fn()
        if fut is not None:
            fut.set_result(result)
    except Exception as exc:  # noqa: BLE001 - report to the caller, keep serving
        if fut is None:
            log.exception("engine command failed")
        else:
            fut.set_exception(exc)
