"""Compile one C++ extension into a private directory, in a child process of the builder.

Run by :mod:`plait.backends.cpu.build_cache` as a script (``runpy``, so no ``plait`` import),
with a JSON object on stdin: ``parent`` (the builder's pid) and the keyword arguments of
``torch.utils.cpp_extension.load`` (``name``, ``sources``, ``extra_cflags``,
``extra_ldflags``, ``build_directory``). Leaves ``<build_directory>/<name>.so`` or exits
non-zero with the compiler's output on stderr.

Why a child process: torch's in-process bookkeeping renames a second build of one name in one
process (``name_v1``), the builder can bound the compile with a timeout, and the compile can
be ended as a whole: the builder starts this process as the leader of a session of its own, which
ninja and the compilers join (ninja puts each command in a process group of its own, so a
process group would miss them; :func:`end_session` ends the session). On Linux this process
is told (``PR_SET_PDEATHSIG``) when the builder dies, and then ends its session: a killed
start leaves no compiler running.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
import time

_PR_SET_PDEATHSIG = 1


def _session_members(session: int) -> list[int]:
    """The live (not zombie) processes of ``session``, from Linux's /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        state, _ppid, _pgrp, sid = stat[stat.rindex(b")") + 2 :].split()[:4]
        if int(sid) == session and state != b"Z":
            members.append(int(entry))
    return members


def end_session(session: int) -> None:
    """SIGKILL every process of ``session`` except the caller (several passes: a process
    may start another between one look and the kill)."""
    if not os.path.isdir("/proc"):  # no way to list a session: its leader's group at least
        with contextlib.suppress(ProcessLookupError):
            os.killpg(session, signal.SIGKILL)
        return
    for _ in range(100):
        others = [pid for pid in _session_members(session) if pid != os.getpid()]
        if not others:
            return
        for pid in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _end_own_session(*_) -> None:
    end_session(os.getsid(0))
    os._exit(1)


def _die_with_parent(parent: int) -> None:
    """End this session (ninja, the compilers, this process) when ``parent`` dies."""
    signal.signal(signal.SIGTERM, _end_own_session)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            return
    except (OSError, AttributeError):  # not Linux: the builder's timeout still bounds us
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        _end_own_session()


def main() -> None:
    spec = json.load(sys.stdin)
    _die_with_parent(spec.pop("parent"))
    from torch.utils.cpp_extension import load

    # is_python_module=False: dlopen the result (every symbol must resolve) without
    # importing it; the builder imports it from its final place
    load(**spec, is_python_module=False, verbose=False)


if __name__ == "__main__":
    main()
