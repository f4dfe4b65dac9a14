"""An exclusive lock around one kernel's build that a killed builder cannot leave behind.

torch's ``FileBaton`` marks a build with the mere existence of a ``lock`` file and waits, with
no limit, for that file to disappear: a build killed mid-way leaves the file, and every later
start waits forever. Here the file is only where the owner is written down; the lock itself
is the kernel's ``flock`` on it, which the kernel drops when the owner's process ends, however
it ends (SIGKILL included). So a waiter whose owner has died takes the lock over at its next
poll, and the file may stay on disk for good.

What holds:

- at most one process holds the lock for a path at a time (on one host; ``flock`` over NFS is
  the server's business, so the wait is also bounded);
- while held, the file records the owner: ``{"pid", "host", "since"}`` (``since``: Unix
  time it took the lock), for the waiter's messages;
- no wait is unbounded: after ``timeout_s`` a waiter raises :class:`BuildLockTimeout`, whose
  message names the lock file, its owner, and what to do.

POSIX only (``fcntl``), as is the CPU backend's build (g++ or clang).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

#: a waiter says once, after this long, whom it is waiting for
_NOTICE_AFTER_S = 10.0


class BuildLockTimeout(TimeoutError):
    """The lock stayed held (by a live process) for longer than the caller would wait."""


def _owner(fd: int) -> dict:
    """The owner recorded in the lock file (``{}`` when unreadable or not yet written)."""
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def _describe(owner: dict) -> str:
    if not owner:
        return "a process that has not written its name yet"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(owner.get("since", 0)))
    return f"pid {owner.get('pid')} on host {owner.get('host')} (since {since})"


def _try_lock(fd: int, path: Path) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:  # e.g. a file system without flock
        raise OSError(
            e.errno,
            f"cannot lock {path} ({e.strerror}); put the kernel builds on a "
            f"local disk with PLAIT_KERNEL_DIR",
        ) from e


def _record_owner(fd: int) -> None:
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)


@contextlib.contextmanager
def build_lock(path: Path, *, timeout_s: float, poll_s: float = 0.2) -> Iterator[None]:
    """Hold the lock at ``path`` (created if missing) for the ``with`` block.

    Waits while a live process holds it, polling every ``poll_s``; raises
    :class:`BuildLockTimeout` after ``timeout_s`` seconds. A lock whose owner has died is free.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
    try:
        start = time.monotonic()
        noticed = False
        while not _try_lock(fd, path):
            waited = time.monotonic() - start
            if waited >= timeout_s:
                raise BuildLockTimeout(
                    f"waited {waited:.0f} s for the kernel build lock {path}, held by "
                    f"{_describe(_owner(fd))}, which is still running (a dead owner frees the "
                    f"lock by itself). If that process is stuck, end it; to wait longer set "
                    f"PLAIT_KERNEL_BUILD_TIMEOUT (seconds); to build in another directory set "
                    f"PLAIT_KERNEL_DIR."
                )
            if not noticed and waited >= _NOTICE_AFTER_S:
                log.warning(
                    "waiting for the kernel build lock %s, held by %s", path, _describe(_owner(fd))
                )
                noticed = True
            time.sleep(min(poll_s, max(timeout_s - waited, 0.0)))
        _record_owner(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the next owner writes itself; an empty file: nobody
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
