"""Child processes of the one-command launchers (``--dp``, ``--pd``): ports, start-up,
health waits, supervision and shutdown, shared by ``data_parallel`` and ``pd_launcher``.

What holds:
- Every port a launcher hands out comes from one :class:`PortBook`, which never repeats one
  or hands out a reserved one (a worker binds its port seconds after it is chosen); a range
  the user pinned (``--router-dp-worker-base-port``, ...) is used exactly or refused with a
  ValueError naming the flag, never replaced by other ports.
- Every child gets a parent-death signal (``kill -9`` of the launcher leaves no orphan,
  Linux) and its share of the cores as its thread count unless the user chose one.
- :func:`wait_healthy` fails fast, naming the child, when one exits during start-up; HTTP
  children answer a path with 200, gRPC children (``grpc://`` URLs) the standard
  ``grpc.health.v1`` check with SERVING.
- :func:`stop_all` stops in the order given (the gateway first: no new requests), SIGTERM
  then SIGKILL after the timeout.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

log = logging.getLogger("plait.launch")

_PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """Start-up failed; the message says which process and why."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PortBook:
    """Ports promised to child processes that may not have bound them yet.

    :func:`free_port` only says a port is free now: a worker binds its port seconds later,
    after loading its model, so a second call can hand out the same port again, or the
    gateway's own ``--port`` (free until the gateway starts last). Every port a launcher
    gives out comes from one book, which never repeats one or hands out a reserved one."""

    def __init__(self, *reserved: int | None):
        self.taken = {p for p in reserved if p}

    def take(self) -> int:
        for _ in range(100):
            port = free_port()
            if port not in self.taken:
                self.taken.add(port)
                return port
        raise RuntimeError(f"no free port outside the {len(self.taken)} already promised")

    def take_range(self, base: int | None, count: int, flag: str) -> list[int]:
        """``count`` ports: ``base, base + 1, ...`` when the user pinned them with ``flag``,
        else free ones. A pinned port past 65535, already promised, or bound by another
        process now is a ValueError naming ``flag`` (before any child starts)."""
        if base is None:
            return [self.take() for _ in range(count)]
        ports = list(range(base, base + count))
        if ports[-1] > 65535:
            raise ValueError(f"{flag} {base}: {count} ports from it run past 65535")
        for port in ports:
            if port in self.taken:
                raise ValueError(f"{flag} {base}: port {port} is already another process's")
            if not port_free(port):
                raise ValueError(f"{flag} {base}: port {port} is in use on 127.0.0.1")
        self.taken.update(ports)
        return ports


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be bound on ``host`` now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def threads_per_worker(dp: int, cores: int | None = None) -> int:
    """Cores split evenly between workers, at least one each: oversubscribed OpenMP threads
    spin on busy cores and make every small op wait a time slice."""
    return max(1, (cores or os.cpu_count() or 1) // dp)


def stop_on_signals() -> threading.Event:
    """An event SIGTERM/SIGINT set: the launchers' main loops wait on it."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def child_env(processes: int) -> dict[str, str]:
    """This environment, with each child's thread count set to its share of the cores unless
    the user chose one (``OMP_NUM_THREADS``)."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        n = threads_per_worker(processes)
        env.update(OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))
    return env


def _die_with_parent() -> None:
    """preexec_fn: deliver SIGTERM to the child when the launcher dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: clean shutdown still covers normal exits
        pass


@dataclass
class Child:
    """One started process: a worker or the gateway. ``url`` is ``http://`` or ``grpc://``."""

    name: str
    url: str
    proc: subprocess.Popen

    def alive(self) -> bool:
        return self.proc.poll() is None


def spawn(name: str, url: str, cmd: list[str], env: dict[str, str]) -> Child:
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
    return Child(name, url, proc)


def connect_host(host: str) -> str:
    """Where to reach a server bound to ``host`` from this machine."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def healthy(url: str, path: str = "/health", headers: dict[str, str] | None = None) -> bool:
    """One health probe: 200 on ``url + path``, or SERVING from a ``grpc://`` server."""
    if url.startswith("grpc://"):
        return grpc_serving(url[len("grpc://") :])
    req = urllib.request.Request(url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def grpc_serving(target: str, timeout: float = 2.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_healthy(
    children: list[Child],
    path: str,
    timeout: float,
    headers: dict[str, str] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Block until every child is healthy (:func:`healthy`); a child that exits first, or
    the deadline, is a :class:`LaunchError` naming it."""
    pending = list(children)
    deadline = time.monotonic() + timeout
    while pending:
        if stop is not None and stop.is_set():
            raise LaunchError("interrupted during start-up")
        for child in list(pending):
            if not child.alive():
                raise LaunchError(
                    f"{child.name} exited with status {child.proc.returncode} "
                    f"during start-up (its log is above)"
                )
            if healthy(child.url, path, headers):
                pending.remove(child)
        if pending and time.monotonic() > deadline:
            names = ", ".join(c.name for c in pending)
            raise LaunchError(f"{names} did not become healthy within {timeout:.0f}s")
        time.sleep(0.3)


def stop_all(children: list[Child], timeout: float) -> None:
    """SIGTERM in order (the gateway first), then SIGKILL whatever outlives ``timeout``."""
    for child in children:
        if child.alive():
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", child.name, timeout)
            child.proc.kill()
            child.proc.wait()


def supervise(gateway: Child, workers: list[Child], stop: threading.Event) -> int:
    """Until a signal (0), the gateway's exit or every worker's (1). A worker that dies alone
    is the gateway's business: it routes around it, and a supervisor that restarts it on the
    same address gives the gateway its worker back; so the launch stops for its workers only
    once every one it started has exited and none of their addresses answers."""
    reported: set[str] = set()
    while not stop.wait(0.5):
        if not gateway.alive():
            log.error("the gateway exited with status %s; stopping", gateway.proc.returncode)
            return 1
        for w in workers:
            if not w.alive() and w.name not in reported:
                reported.add(w.name)
                log.warning(
                    "%s exited with status %s; the gateway routes around it",
                    w.name,
                    w.proc.returncode,
                )
        if len(reported) == len(workers) and not any(healthy(w.url) for w in workers):
            log.error("every worker has exited; stopping")
            return 1
    return 0
